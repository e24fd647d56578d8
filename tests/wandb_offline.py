"""Reads the records of an offline W&B run file (``run-<id>.wandb``), for tests.

The file is a log of 32 KiB blocks; each record chunk has a 7-byte header (crc32, length, type) and
protobuf ``Record`` payloads split over FULL / FIRST / MIDDLE / LAST chunks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

FILE_HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, LAST = 1, 4


def records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    raw = path.read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    position, pieces = FILE_HEADER, []
    while position + CHUNK_HEADER <= len(raw):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < CHUNK_HEADER:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + CHUNK_HEADER])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            position += left_in_block
            continue
        start = position + CHUNK_HEADER
        pieces.append(raw[start : start + length])
        position = start + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(pieces))
            pieces = []
            yield record


def summary(run_dir: Path) -> dict:
    """Everything a test wants from the single offline W&B run under ``run_dir``."""
    run_files = list(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    if len(run_files) != 1:
        raise AssertionError(f"expected one offline W&B run under {run_dir}, found {run_files}")
    found = {"history_keys": set(), "config_keys": set(), "summary_keys": set(), "tags": [], "name": None,
             "artifacts": []}
    for record in records(run_files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            found["name"] = record.run.display_name
            found["tags"] = list(record.run.tags)
            found["config_keys"] |= {item.key for item in record.run.config.update}
        elif kind == "config":
            found["config_keys"] |= {item.key for item in record.config.update}
        elif kind == "history":
            found["history_keys"] |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "artifact":
            found["artifacts"].append({"type": record.artifact.type, "aliases": list(record.artifact.aliases)})
        elif kind == "summary":
            found["summary_keys"] |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
    return found
