"""``callbacks.throughput.ThroughputMeter``: what it counts and what it writes."""

from __future__ import annotations

import json

import pytest
import torch

from callbacks.throughput import ThroughputMeter, count_images
from cli import main
from tests.methods import CASES, run_dir


def test_images_are_counted_by_their_colour_axis():
    batch = {"source": {"image": torch.zeros(4, 3, 8, 8), "mask": torch.zeros(4, 1, 8, 8), "label": torch.zeros(4)},
             "target": {"image": torch.zeros(4, 3, 8, 8)},
             "references": torch.zeros(2, 5, 3, 8, 8), "index": torch.arange(2), "path": ["a", "b"]}
    assert count_images(batch) == 4 + 4 + 10
    assert count_images(torch.zeros(4, 3, 8, 8, dtype=torch.uint8)) == 0  # not a model input
    with pytest.raises(ValueError, match="warmup_batches >= 0"):
        ThroughputMeter(warmup_batches=-1)


def test_a_fit_and_test_write_throughput_json(surfaces_root, tmp_path):
    dann = next(case for case in CASES if case.name == "dann")
    main(["fit", *dann.args(surfaces_root, tmp_path, {}), dann.batch_option, "4", "--trainer.max_steps", "6",
          "--run.test_after_fit", "true",
          "--trainer.callbacks+=callbacks.throughput.ThroughputMeter", "--trainer.callbacks.warmup_batches", "2"])
    measured = json.loads((run_dir(tmp_path, dann) / "throughput.json").read_text())
    train, test = measured["train"], measured["test"]
    # a DANN batch holds a source and a target batch of 4 images each; 2 of the 6 batches are warm-up
    assert train["timed_batches"] == 4 and train["images_per_batch"] == 8
    assert train["images_per_s"] > 0 and train["device"] == "cpu" and train["peak_memory_mib"] is None
    assert test["timed_batches"] >= 1 and test["images_per_s"] > 0
