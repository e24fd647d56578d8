"""Issue 19's figures over several domain pairs: the ledgers of ``benchmarks/cross_domain.py`` (one per pair, or
several methods of one pair) summarised as the mean over pairs, per method, setting and k.

    python benchmarks/cross_domain_summary.py docs/results/cross_domain.json /tmp/runner/synthetic_*/cross_domain.json \\
        --out docs/results/cross_domain_summary

Per pair, a setting's figure is its target image AUROC averaged over its folds and seeds (one ledger per seed). Then, over
the pairs that have the setting and both bounds:

- ``mean AUROC``: the mean of the pairs' figures;
- ``gap recovered``: the mean of the pairs' (setting − source-only) / (target-full − source-only), over the pairs
  whose gap is wider than the runner's ``MIN_GAP`` (how many is said);
- ``worst − source-only``: the lowest (setting − source-only) of any pair, the "never worse" check;
- ``− better trivial``: the mean over pairs of setting − max(``k_only``, ``source_plus_k``) at the same k (of
  those run: PaDiM has no ``k_only`` at k = 1), over the pairs that have a trivial row at that k.

Writes ``<out>.md`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.cross_domain import COLUMNS, MIN_GAP, SETTINGS, mean_of  # noqa: E402
from benchmarks.runner import markdown_table  # noqa: E402

TRIVIAL = ("k_only", "source_plus_k")
BOUNDS = ("source_only", "target_full")


def gap_metric(method: str) -> str:
    return COLUMNS[0][2 if method == "dann" else 1]


def ledger_records(ledger: Path) -> list[dict]:
    """The records of a ``cross_domain.py`` ledger; a file that is not one is named."""
    try:
        records = json.loads(ledger.read_text())["records"]
        for record in records:
            _ = record["method"], record["setting"], record["sweep"]["source"], record["sweep"]["target"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{ledger} is not a cross_domain.py ledger (expected JSON {{\"records\": [...]}} with "
                         f"method, setting and sweep in each record): {type(error).__name__}: {error}") from error
    return records


def per_pair(ledgers: list[Path]) -> dict[str, dict[str, dict[tuple, float]]]:
    """method -> pair -> (setting, k) -> the pair's figure (mean over folds and seeds). A job (pair, fold, seed)
    found in two ledgers counts once, as the later ledger has it (said on stdout)."""
    jobs: dict[tuple, tuple[Path, dict]] = {}
    for ledger in ledgers:
        replaced = defaultdict(int)
        for record in ledger_records(ledger):
            pair = f"{record['sweep']['source']} → {record['sweep']['target']}"
            key = (record["method"], pair, record["setting"], record.get("k"), record.get("fold"),
                   record["sweep"].get("seed"))
            if key in jobs:
                replaced[jobs[key][0]] += 1
            jobs[key] = (ledger, record)
        for earlier, count in replaced.items():
            print(f"{ledger}: {count} job(s) replace the same jobs of {earlier}")
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for (method, pair, setting, k, _, _), (_, record) in jobs.items():
        cells[(method, pair, setting, k)].append(record)
    figures: dict[str, dict[str, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for (method, pair, setting, k), records in cells.items():
        value = mean_of(records, gap_metric(method))
        if value is not None:
            figures[method][pair][(setting, k)] = value
    return figures


def summary_rows(figures: dict) -> list[dict]:
    rows = []
    for method in (m for m in SETTINGS if m in figures):
        pairs = {pair: f for pair, f in figures[method].items() if all((b, None) in f for b in BOUNDS)}
        keys = sorted({key for f in pairs.values() for key in f if key[0] not in BOUNDS},
                      key=lambda key: (SETTINGS[method].index(key[0]), key[1] or 0))
        for setting, k in [("source_only", None), *keys, ("target_full", None)]:
            having = {pair: f for pair, f in pairs.items() if (setting, k) in f}
            values = [f[(setting, k)] for f in having.values()]
            gaps = [(f[(setting, k)] - f[("source_only", None)]) / (f[("target_full", None)] - f[("source_only", None)])
                    for f in having.values() if f[("target_full", None)] - f[("source_only", None)] > MIN_GAP]
            trivial = [f[(setting, k)] - max(f[(t, k)] for t in TRIVIAL if (t, k) in f)
                       for f in having.values() if any((t, k) in f for t in TRIVIAL)]
            rows.append({"method": method, "setting": setting, "k": k, "pairs": len(values),
                         "mean_auroc": statistics.mean(values),
                         "gap_recovered": statistics.mean(gaps) if gaps and setting not in BOUNDS else None,
                         "gap_pairs": len(gaps),
                         "worst_minus_source_only": (min(f[(setting, k)] - f[("source_only", None)]
                                                         for f in having.values())
                                                     if setting not in BOUNDS else None),
                         "minus_better_trivial": statistics.mean(trivial) if trivial and setting not in TRIVIAL
                         else None,
                         "trivial_pairs": len(trivial)})
    return rows


def markdown(rows: list[dict], pairs: dict[str, list[str]]) -> str:
    def signed(value: float | None, count: int | None = None) -> str:
        return "—" if value is None else f"{value:+.3f}" + (f" ({count})" if count is not None else "")

    table = markdown_table(
        ["method", "setting", "k", "pairs", "mean target image AUROC", "gap recovered (pairs with a gap)",
         "worst pair − source-only", "− better trivial row (pairs with one)"],
        ([r["method"], r["setting"], "—" if r["k"] is None else str(r["k"]), str(r["pairs"]), f"{r['mean_auroc']:.3f}",
          signed(r["gap_recovered"], r["gap_pairs"] if r["gap_recovered"] is not None else None),
          signed(r["worst_minus_source_only"]),
          signed(r["minus_better_trivial"], r["trivial_pairs"] if r["minus_better_trivial"] is not None else None)]
         for r in rows))
    listed = [f"- {method}: {', '.join(sorted(names))}" for method, names in pairs.items()]
    return "\n".join(["Pairs per method:", *listed, "", *table]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ledgers", nargs="+", type=Path, help="cross_domain.json ledgers")
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.md and <out>.json")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.ledgers if not p.is_file()]
    if missing:
        parser.error(f"no such ledger: {', '.join(missing)}")
    try:
        figures = per_pair(args.ledgers)
    except ValueError as error:
        parser.error(str(error))
    rows = summary_rows(figures)
    pairs = {method: list(figures[method]) for method in figures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"pairs": pairs, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, pairs))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
