"""Throughput of the GMM pseudo-defect generator and of pre-training steps, on CPU.

- generator: θ_GMM sampling + rendering (``render_defects``, K=30, C=3) of batches at 224 px, and the
  dataset items (pool crop + θ draw) that feed it, in images/s;
- pre-training: optimizer steps of ``GMMPretrain`` (render, regress, loss, backward, Adam) at the
  CPU-sized setting of ``configs/gmm_pretrain/gmm_surfaces.yaml``, for L_direct and L_indirect.

    python benchmarks/gmm_throughput.py --out docs/results/gmm_throughput
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning_modules.components.gmm_defects import render_defects, sample_gmm_params  # noqa: E402
from lightning_modules.gmm_pretrain import GMMPretrain, GMMPretrainDataModule  # noqa: E402


def timed(step, repeats: int) -> float:
    """Seconds per call of ``step`` after one warm-up call."""
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def generator_rates(image_size: int, batch: int, repeats: int) -> dict[str, float]:
    images = torch.rand(batch, 3, image_size, image_size)
    render = timed(lambda: render_defects(images, sample_gmm_params(batch, 30, 3)), repeats)
    data = GMMPretrainDataModule(image_size=image_size, train_samples=10_000, batch_size=batch)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    items = timed(lambda: next(batches), repeats)
    return {"render_images_per_s": batch / render, "dataset_items_per_s": batch / items}


def pretrain_rates(loss: str, image_size: int, batch: int, repeats: int) -> dict[str, float]:
    module = GMMPretrain(loss=loss)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-4)
    data = GMMPretrainDataModule(image_size=image_size, train_samples=10_000, batch_size=batch, min_crop=0.25)
    data.setup("fit")
    batch_data = next(iter(data.train_dataloader()))

    def step() -> None:
        normal, anomalous, target = module.pseudo_defects(batch_data)
        losses = module.both_losses(normal, anomalous, target, module.model(anomalous))
        optimizer.zero_grad()
        losses[loss].backward()
        optimizer.step()

    seconds = timed(step, repeats)
    return {"steps_per_s": 1 / seconds, "images_per_s": batch / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--render-size", type=int, default=224)
    parser.add_argument("--render-batch", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--train-batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"command": " ".join(sys.argv), "threads": args.threads,
              "generator": generator_rates(args.render_size, args.render_batch, args.repeats),
              "pretrain": {loss: pretrain_rates(loss, args.train_size, args.train_batch, args.repeats)
                           for loss in ("direct", "indirect")}}
    gen = report["generator"]
    lines = ["| what | setting | rate |", "|---|---|---|",
             f"| θ sampling + rendering | {args.render_size} px, batch {args.render_batch}, K=30, C=3 | "
             f"{gen['render_images_per_s']:.1f} images/s |",
             f"| dataset items (pool crop + θ draw) | {args.render_size} px | {gen['dataset_items_per_s']:.1f} items/s |"]
    for loss, rate in report["pretrain"].items():
        lines.append(f"| pre-training step, L_{loss} | efficientnet_lite0, {args.train_size} px, batch "
                     f"{args.train_batch} | {rate['steps_per_s']:.3f} steps/s ({rate['images_per_s']:.1f} images/s) |")
    text = "\n".join(lines) + f"\n\nCPU, {args.threads} thread(s), shared machine under load."
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        args.out.with_suffix(".md").write_text(f"`{report['command']}`\n\n{text}\n")


if __name__ == "__main__":
    main()
