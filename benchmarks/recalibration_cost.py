"""What ShiftAD's target recalibration costs (issue 19): k = 10 shots × 4 flips, CS-Flow at its default 160 px
(flow hidden width 64; flow-output standardisation, and the extractor's statistics per scale at 128 and 160 px,
which also measure 64 training images and score the shots' pseudo-defects twice), PaDiM at 224 px with its default backbone and DenseHybrid's light build trained end to end
(freeze none: AdaBN of its 50 BatchNorms) at its embedded config's 128 px and at the MVTec config's 256 px, on
random weights and images (the cost does not depend on them); the best and mean of 3 timed runs after one warm-up.

    python benchmarks/recalibration_cost.py                # CUDA when there is a GPU, else the CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from lightning_modules.components.target_recalibration import RecalibrationSpec  # noqa: E402
from lightning_modules.csflow import CSFlow  # noqa: E402
from lightning_modules.densehybrid import DenseHybridAD  # noqa: E402
from lightning_modules.padim import Padim  # noqa: E402


class UnlabelledShots:
    """A DataModule with nothing but k target shots and, if given, training images (what the recalibration reads)."""

    def __init__(self, images: torch.Tensor, training: torch.Tensor | None = None) -> None:
        self.images = images
        self.train_dataset = None if training is None else [{"image": image} for image in training]

    def target_train_dataloader(self) -> DataLoader:
        return DataLoader([{"image": image} for image in self.images], batch_size=4)

    def val_dataloader(self) -> list:
        return []


def timed(run: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        seconds.append(time.perf_counter() - start)
    return min(seconds), sum(seconds) / len(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} CPU threads")

    csflow = CSFlow(image_size=160, hidden_channels=64,
                    target_recalibration=RecalibrationSpec(prior_count=2)).to(device).eval()
    shots = UnlabelledShots(torch.rand(args.shots, 3, 160, 160))
    best, mean = timed(lambda: csflow.recalibrate_to_target(shots), device, args.repeats)
    print(f"CS-Flow, k={args.shots} x 4 flips, 160 px: best {best:.3f} s, mean {mean:.3f} s")
    for size in (128, 160):  # the cross-domain sweeps' size and the config's
        extractor = CSFlow(image_size=size, hidden_channels=64,
                           target_recalibration=RecalibrationSpec(prior_count=2, extractor_statistics=True))
        extractor = extractor.to(device).eval()
        shots = UnlabelledShots(torch.rand(args.shots, 3, size, size), torch.rand(64, 3, size, size))
        best, mean = timed(lambda extractor=extractor, shots=shots: extractor.recalibrate_to_target(shots), device,
                           args.repeats)
        print(f"CS-Flow extractor statistics (then the standardisation where declined), k={args.shots} x 4 flips, "
              f"{size} px: best {best:.3f} s, mean {mean:.3f} s")

    padim = Padim(target_recalibration=RecalibrationSpec()).to(device)
    with torch.no_grad():
        for _ in range(3):
            padim.model.accumulate(padim.model.embed(torch.rand(32, 3, 224, 224, device=device)))
    source = padim.model.gaussians()
    shots = UnlabelledShots(torch.rand(args.shots, 3, 224, 224))

    def recalibrate_padim() -> None:
        padim.model.set_gaussians(source, 96)  # from the source statistics every time
        padim.recalibrate_to_target(shots)

    for align_channels in (False, "auto"):  # auto scores both variants in the safety rule
        padim.target_recalibration = RecalibrationSpec(align_channels=align_channels)
        best, mean = timed(recalibrate_padim, device, args.repeats)
        print(f"PaDiM, k={args.shots} x 4 flips, 224 px, align_channels {align_channels}: best {best:.3f} s, "
              f"mean {mean:.3f} s")

    # prepare_scoring starts from the source statistics every time
    densehybrid = DenseHybridAD(freeze="none", target_recalibration=RecalibrationSpec(prior_count=2)).to(device).eval()
    for size in (128, 256):
        shots = UnlabelledShots(torch.rand(args.shots, 3, size, size))
        best, mean = timed(lambda shots=shots: densehybrid.prepare_scoring(shots), device, args.repeats)
        print(f"DenseHybrid (light, freeze none), k={args.shots} x 4 flips, {size} px: best {best:.3f} s, "
              f"mean {mean:.3f} s")


if __name__ == "__main__":
    main()
