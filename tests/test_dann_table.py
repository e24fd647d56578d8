from benchmarks.dann_table import ADABN_STATISTICS, tables

MODES = ("source_only", "adabn")


def record(category: str, mode: str, seed: int, accuracy: float) -> dict:
    return {"direction": "gray_to_rgb", "category": category, "mode": mode, "seed": seed, "seconds": 1.0,
            "target_accuracy": accuracy, "target_auroc": accuracy, "source_accuracy": accuracy,
            **({"adabn_statistics": ADABN_STATISTICS} if mode == "adabn" else {})}


def mean_row(markdown: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith("| **mean**"))


def test_mean_row_averages_only_seeds_with_every_category_and_mode():
    seed0 = [record(c, m, 0, a) for c, a in (("brick", 0.6), ("grass", 0.8)) for m in MODES]
    # Seed 1 has brick in both modes but no grass yet: its brick-only mean must not enter the row.
    seed1 = [record("brick", m, 1, 0.2) for m in MODES]
    row = mean_row(tables(seed0 + seed1, MODES))
    assert row == "| **mean** (seeds 0) | 70.00 (n=1) | 70.00 (n=1) |"
    seed1 += [record("grass", m, 1, 0.4) for m in MODES]
    assert mean_row(tables(seed0 + seed1, MODES)) == "| **mean** (seeds 0, 1) | 50.00 ± 28.28 (n=2) | 50.00 ± 28.28 (n=2) |"


def test_mean_row_says_when_no_seed_is_complete_and_stale_adabn_does_not_count():
    stale = {**record("brick", "adabn", 0, 0.9), "adabn_statistics": None}
    row = mean_row(tables([record("brick", "source_only", 0, 0.5), stale], MODES))
    assert row == "| **mean** (no seed complete) | — | — |"
