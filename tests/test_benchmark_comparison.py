"""Benchmark verdicts call a difference only when the paired runs support it."""

import pytest

from benchmarks.comparison import paired_verdict
from benchmarks.densehybrid_table import mask_vs_rectangle


def rows(mask: list[float], rectangle: list[float]) -> dict:
    categories = ["brick", "grass", "gravel", "woven"]
    return {key: {"runs": {c: {"pixel AUROC": v} for c, v in zip(categories, values, strict=True)}}
            for key, values in (("freeze-all_mask", mask), ("freeze-all_rectangle", rectangle))}


def test_a_difference_inside_the_spread_is_a_tie():
    # The published case: hundredths apart, both at chance, the sign flips between categories.
    verdict = mask_vs_rectangle(rows([0.548, 0.545, 0.418, 0.47], [0.53, 0.54, 0.43, 0.46]))
    assert "a tie" in verdict and "is higher" not in verdict
    assert "higher on 3 of 4" in verdict


def test_a_consistent_difference_names_the_higher_setting():
    verdict = mask_vs_rectangle(rows([0.80, 0.82, 0.79, 0.85], [0.60, 0.61, 0.62, 0.63]))
    assert verdict.endswith("mask is higher, one seed")
    assert paired_verdict({"a": 0.1, "b": 0.2}, {"a": 0.5, "b": 0.7}, "x", "y", "seeds").endswith("y is higher")


def test_one_shared_unit_is_refused():
    with pytest.raises(ValueError, match="at least 2 shared seeds"):
        paired_verdict({"a": 1.0}, {"a": 0.0, "b": 1.0}, "x", "y", "seeds")
