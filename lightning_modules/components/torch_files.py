"""Reading torch files named in a config, with errors that name the config key, the file and what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load_torch_file(path: str | Path, key: str, expected: str) -> Any:
    """``torch.load(weights_only=True)`` on the CPU of the file that config key ``key`` names.

    A missing, truncated or corrupt file raises an error naming ``key``, the file and ``expected`` (a few
    words: what the file should hold), instead of torch's bare zip-reader or unpickler message.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r}: no such file (expected {expected})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{key}={str(path)!r} could not be read as {expected}: the file is truncated, corrupt or not "
                         f"a torch file (torch.load(weights_only=True) said: {reason})") from err
