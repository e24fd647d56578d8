"""PaDiM fit peak memory (RSS) at 100 vs 1000 training images: the float64 sums must keep it flat.

Each size runs in a fresh child process: one surfaces training image repeated N times, fitted by
``lightning_modules.padim.Padim`` (packaged EfficientNet-Lite0, 100 channels) with a Lightning ``Trainer``
(one epoch, no logger, no checkpoint); the child reports its peak RSS (``ru_maxrss``).

    python benchmarks/padim_memory.py --out docs/results/padim_memory

writes ``<out>.json`` and ``<out>.md`` and exits with status 1 if the ratio exceeds 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MAX_RATIO = 1.2


def child(count: int, image_size: int, batch_size: int) -> None:
    import torch
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader, Dataset

    from datamodules import OneClassDataModule
    from datamodules.domain import Domain
    from lightning_modules.padim import Padim

    torch.set_num_threads(1)
    data = OneClassDataModule(source=Domain(dataset="surfaces", category="brick"), image_size=image_size,
                              val_fraction=0.0)
    data.setup("fit")
    sample = data.train_dataset[0]

    class Repeated(Dataset):
        def __len__(self) -> int:
            return count

        def __getitem__(self, index: int) -> dict:
            return sample

    model = Padim(num_features=100)
    trainer = Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=DataLoader(Repeated(), batch_size=batch_size))
    assert int(model.model.count) == count
    print(json.dumps({"images": count, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "fit_seconds": round(time.perf_counter() - start, 1),
                      "statistics_mb": sum(t.numel() * t.element_size() for t in
                                           (model.model.feature_sum, model.model.outer_sum)) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.image_size, args.batch_size)
        return
    rows = []
    for count in args.counts:
        result = subprocess.run([sys.executable, __file__, "--child", str(count), "--image-size", str(args.image_size),
                                 "--batch-size", str(args.batch_size)], cwd=REPO, capture_output=True, text=True,
                                check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    report = {"command": " ".join(sys.argv), "image_size": args.image_size, "rows": rows,
              "ratio_last_to_first": round(ratio, 3), "max_ratio": MAX_RATIO}
    lines = ["| training images | peak RSS (MB) | statistics Σx, Σxxᵀ (MB) | fit (s) |", "|---|---|---|---|"]
    lines += [f"| {r['images']} | {r['peak_rss_mb']:.0f} | {r['statistics_mb']:.0f} | {r['fit_seconds']} |" for r in rows]
    lines.append(f"\nratio {rows[-1]['images']} / {rows[0]['images']} images: {ratio:.3f} (must be <= {MAX_RATIO})")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        args.out.with_suffix(".md").write_text(f"`{report['command']}`\n\n{text}\n")
    sys.exit(0 if ratio <= MAX_RATIO else 1)


if __name__ == "__main__":
    main()
