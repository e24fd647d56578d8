"""Paired comparisons for the benchmark tables: a verdict says "higher" only when the runs support it.

Two settings measured on the same units (categories, seeds or folds) are compared unit by unit. The
difference counts only when its mean is at least two standard errors of the paired differences away
from zero; otherwise the verdict is a tie, and the text gives the numbers that make it one.
"""

from __future__ import annotations

import math
import statistics

#: a difference is called only beyond this many standard errors of the paired differences
STANDARD_ERRORS = 2.0


def paired_verdict(first: dict[str, float], second: dict[str, float], first_name: str, second_name: str,
                   units: str = "categories") -> str:
    """One line comparing ``first`` with ``second`` over their shared keys (the paired units)."""
    shared = [key for key in first if key in second]
    if len(shared) < 2:
        raise ValueError(f"a paired comparison needs at least 2 shared {units}, got {shared}")
    differences = [first[key] - second[key] for key in shared]
    mean = statistics.fmean(differences)
    error = statistics.stdev(differences) / math.sqrt(len(differences))
    wins = sum(d > 0 for d in differences)
    text = (f"{first_name} − {second_name} = {mean:+.4f} ± {error:.4f} (standard error over {len(shared)} {units}; "
            f"{first_name} higher on {wins} of {len(shared)})")
    if abs(mean) < STANDARD_ERRORS * error or error == 0 and mean == 0:
        return f"{text}: a tie (the difference is within {STANDARD_ERRORS:g} standard errors)"
    return f"{text}: {first_name if mean > 0 else second_name} is higher"
