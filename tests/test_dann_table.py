import json
import sys

import pytest

from benchmarks import dann_table
from benchmarks.dann_table import ADABN_STATISTICS, tables

MODES = ("source_only", "adabn")


def record(category: str, mode: str, seed: int, accuracy: float) -> dict:
    return {"direction": "gray_to_rgb", "category": category, "mode": mode, "seed": seed, "seconds": 1.0,
            "target/accuracy": accuracy, "target/auroc": accuracy, "source/accuracy": accuracy,
            **({"adabn_statistics": ADABN_STATISTICS} if mode == "adabn" else {})}


def mean_row(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith("| **mean**"))


def test_mean_row_averages_only_seeds_with_every_category_and_mode():
    seed0 = [record(c, m, 0, a) for c, a in (("brick", 0.6), ("grass", 0.8)) for m in MODES]
    # Seed 1 has brick in both modes but no grass yet: its brick-only mean must not enter the row.
    seed1 = [record("brick", m, 1, 0.2) for m in MODES]
    row = mean_row(tables(seed0 + seed1))
    assert row == "| **mean** (seeds 0) | 70.00 (n=1) | 70.00 (n=1) |"
    seed1 += [record("grass", m, 1, 0.4) for m in MODES]
    assert mean_row(tables(seed0 + seed1)) == "| **mean** (seeds 0, 1) | 50.00 ± 28.28 (n=2) | 50.00 ± 28.28 (n=2) |"


def test_mean_row_says_when_no_seed_is_complete_and_stale_adabn_does_not_count():
    stale = {**record("grass", "adabn", 0, 0.9), "adabn_statistics": None}
    current = [record(c, "source_only", 0, 0.5) for c in ("brick", "grass")] + [record("brick", "adabn", 0, 0.5)]
    row = mean_row(tables(current + [stale]))
    assert row == "| **mean** (no seed complete) | — | — |"


def test_table_only_writes_every_mode_of_the_ledger_not_only_the_modes_given(tmp_path, monkeypatch):
    out = tmp_path / "table"
    rows = [record("brick", m, 0, 0.5) for m in ("source_only", "adabn", "adda")]
    out.with_suffix(".json").write_text(json.dumps({"records": rows}))
    monkeypatch.setattr(sys, "argv", ["dann_table.py", "--out", str(out), "--modes", "adabn", "--table-only"])
    dann_table.main()
    header = next(line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| category"))
    assert header == "| category | source_only | adabn | adda |"


def test_sweep_runs_each_adabn_test_right_after_its_source_only_fit_from_that_checkpoint(tmp_path, monkeypatch):
    calls = []

    def fake_run_job(direction, category, mode, seed, args, checkpoint=None):
        calls.append((category, mode, checkpoint))
        if (category, mode) == ("grass", "source_only"):
            raise RuntimeError("grass source_only failed")
        run_dir = tmp_path / "runs" / category / mode
        run_dir.mkdir(parents=True)
        (run_dir / "best.ckpt").write_bytes(b"")
        (run_dir / "results.json").write_text(json.dumps({"checkpoint": str(run_dir / "best.ckpt")}))
        return {**record(category, mode, seed, 0.5), "direction": direction, "run_dir": str(run_dir)}

    monkeypatch.setattr(dann_table, "run_job", fake_run_job)
    monkeypatch.setattr(sys, "argv", ["dann_table.py", "--out", str(tmp_path / "table"), "--seeds", "0",
                                      "--directions", "gray_to_rgb", "--categories", "brick", "grass"])
    with pytest.raises(SystemExit, match="1 job"):
        dann_table.main()
    assert [(c, m) for c, m, _ in calls] == [
        ("brick", "source_only"), ("brick", "adabn"), ("brick", "dann"), ("brick", "adda"),
        ("grass", "source_only"), ("grass", "adabn"), ("grass", "dann"), ("grass", "adda")]
    checkpoints = {(c, m): checkpoint for c, m, checkpoint in calls}
    assert checkpoints["brick", "adabn"] == tmp_path / "runs" / "brick" / "source_only" / "best.ckpt"
    assert checkpoints["grass", "adabn"] is None  # its fit failed, so adabn fits on its own
