"""PaDiM inference cost, ShiftAD against anomalib, on the same images in one run.

The work: PaDiM with a randomly initialised ResNet-18 (layer1-3, 100 random channels), 256 px, batch 32, one
thread, fitted on one category's train normals (not timed), then timed on its test split:

- ``forward``: the model alone on the preloaded test images (image scores and full-size anomaly maps);
- ``test``: each framework's test loop (``Trainer.test`` / ``Engine.test``): reading the images, the model,
  and each framework's own test metrics;
- ``predict``: each framework's predict loop over the test images as an unlabelled folder, with its
  normalised scores, decisions and masks, and no files written.

Each framework runs in its own process and Python environment (anomalib is an optional peer, installed in
a separate venv given by ``--peer-python``); rounds alternate ShiftAD / anomalib, so both see the same
machine load, and the figure is the ratio of their CPU seconds per image within a round (the median over
rounds). Wall seconds are reported beside them.

    python benchmarks/inference_speed.py --peer-python /work/peer-venv/bin/python --rounds 3 \\
        --out docs/results/inference_speed
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("forward", "test", "predict")
FRAMEWORKS = ("shiftad", "anomalib")
# What each framework's test loop computes, for the report (compare like with like).
TEST_METRICS = {
    "shiftad": "image AUROC, AP, F1-max, FPR@95TPR; pixel AUROC, AP, F1-max, FPR@95TPR, AUPRO (exact curves)",
    "anomalib": "image AUROC, F1 (at its adaptive threshold); pixel AUROC, F1 (at its adaptive threshold)",
}


class Timer:
    """CPU seconds of this process (all threads, user + system) and wall seconds of a block."""

    def __enter__(self) -> Timer:
        self.cpu, self.wall = -time.process_time(), -time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu += time.process_time()
        self.wall += time.perf_counter()


# ---------------------------------------------------------------------------------------------- workers

# Where ShiftAD's test loop spends CPU time: (label, end of the file name, function), cumulative seconds.
PROFILED = (
    ("reading images", "datamodules/dataset.py", "__getitem__"),
    ("test_step (all per-batch work)", "lightning_modules/base.py", "test_step"),
    ("backbone", "lightning_modules/components/backbone.py", "forward"),
    ("mahalanobis", "lightning_modules/padim/torch_model.py", "mahalanobis"),
    ("map blur (separable)", "lightning_modules/components/anomaly_map.py", "gaussian_blur_maps"),
    ("map blur (2-D, torchvision)", "torchvision/transforms/functional.py", "gaussian_blur"),
    ("bilinear upsampling", "torch/nn/functional.py", "interpolate"),
    ("image metrics", "lightning_modules/components/metrics.py", "image_metrics"),
    ("pixel metrics", "lightning_modules/components/metrics.py", "pixel_metrics"),
)


def test_profile(stats: pstats.Stats) -> dict[str, float]:
    found: dict[str, float] = {}
    for (path, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        for label, suffix, name in PROFILED:
            if function == name and path.endswith(suffix):
                found[label] = found.get(label, 0.0) + cumulative
    return found



def shiftad_worker(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    import torch
    from lightning.pytorch import Trainer

    from datamodules import OneClassDataModule
    from lightning_modules.components.backbone import BackboneSpec
    from lightning_modules.padim import Padim

    torch.manual_seed(0)
    source = {"dataset": "folder", "root": str(args.root), "category": args.category, "shift": None}

    def datamodule(**extra) -> OneClassDataModule:
        return OneClassDataModule(source=source, image_size=args.image_size, batch_size=args.batch_size,
                                  num_workers=0, **extra)

    model = Padim(backbone=BackboneSpec(name="resnet18", weights="random"), layers=[1, 2, 3], num_features=100)
    trainer_args = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    Trainer(max_epochs=1, **trainer_args).fit(model, datamodule=datamodule())
    model.eval()
    results: dict = {}
    test_data = datamodule()
    test_data.setup("test")
    images = [batch["image"] for batch in test_data.test_dataloader()[0]]
    with torch.no_grad(), Timer() as forward:
        for batch in images:
            model.anomaly_scores(batch)
    results["forward"] = {"cpu_s": forward.cpu, "wall_s": forward.wall, "images": sum(len(b) for b in images)}

    trainer = Trainer(**trainer_args)
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    with Timer() as test:
        if profiler:
            profiler.enable()
        trainer.test(model, datamodule=test_data, verbose=False)
        if profiler:
            profiler.disable()
    results["test"] = {"cpu_s": test.cpu, "wall_s": test.wall, "images": len(test_data.test_dataset),
                       "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}
    if profiler:
        results["test"]["profile_cpu_s"] = test_profile(pstats.Stats(profiler))

    if "predict" not in args.stages:
        return results
    predict_data = datamodule(predict_path=str(args.root / args.category / "test"))
    with Timer() as predict:
        outputs = Trainer(**trainer_args).predict(model, datamodule=predict_data)
    results["predict"] = {"cpu_s": predict.cpu, "wall_s": predict.wall, "images": sum(len(o["path"]) for o in outputs)}
    return results


def anomalib_worker(args: argparse.Namespace) -> dict:
    import logging

    import torch
    from anomalib.data import MVTecAD, PredictDataset
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from torch.utils.data import DataLoader

    logging.getLogger("anomalib").setLevel(logging.WARNING)
    torch.manual_seed(0)
    # The visualizer writes an image file per test image; ShiftAD's test writes none, so it is off here.
    model = Padim(backbone="resnet18", layers=["layer1", "layer2", "layer3"], pre_trained=False, visualizer=False)
    data = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size,
                   eval_batch_size=args.batch_size, num_workers=0)
    engine_args = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                   "default_root_dir": str(args.scratch), "accelerator": "cpu", "devices": 1}
    Engine(**engine_args).fit(model, datamodule=data)
    model.eval()
    data.setup("test")
    images = [batch.image for batch in data.test_dataloader()]
    results: dict = {}
    with torch.no_grad(), Timer() as forward:
        for batch in images:
            model.model(batch)
    results["forward"] = {"cpu_s": forward.cpu, "wall_s": forward.wall, "images": sum(len(b) for b in images)}

    engine = Engine(**engine_args)
    with Timer() as test:
        metrics = engine.test(model, datamodule=data, verbose=False)
    results["test"] = {"cpu_s": test.cpu, "wall_s": test.wall, "images": len(data.test_data),
                       "metrics": {k: float(v) for k, v in metrics[0].items()}}

    if "predict" not in args.stages:
        return results
    folder = PredictDataset(path=args.root / args.category / "test", image_size=(args.image_size, args.image_size))
    loader = DataLoader(folder, batch_size=args.batch_size, collate_fn=folder.collate_fn, num_workers=0)
    with Timer() as predict:
        outputs = Engine(**engine_args).predict(model, dataloaders=loader, return_predictions=True)
    results["predict"] = {"cpu_s": predict.cpu, "wall_s": predict.wall,
                          "images": sum(len(o.image_path) for o in outputs)}
    return results


# ---------------------------------------------------------------------------------------------- orchestration


def run_worker(framework: str, python: str, args: argparse.Namespace, scratch: Path) -> dict:
    command = [python, str(Path(__file__).resolve()), "--worker", framework, "--root", str(args.root),
               "--category", args.category, "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--scratch", str(scratch), "--stages", *args.stages]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {framework} worker failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - start
    return result


def per_image(result: dict, stage: str, key: str) -> float:
    return result[stage][key] / result[stage]["images"]


def summarise(rounds: list[dict], stages: list[str]) -> dict:
    summary = {}
    for stage in stages:
        ratios = [per_image(r["shiftad"], stage, "cpu_s") / per_image(r["anomalib"], stage, "cpu_s") for r in rounds]
        wall_ratios = [per_image(r["shiftad"], stage, "wall_s") / per_image(r["anomalib"], stage, "wall_s")
                       for r in rounds]
        summary[stage] = {
            **{f"{fw}_cpu_s_per_image": [per_image(r[fw], stage, "cpu_s") for r in rounds] for fw in FRAMEWORKS},
            **{f"{fw}_wall_s_per_image": [per_image(r[fw], stage, "wall_s") for r in rounds] for fw in FRAMEWORKS},
            "cpu_ratio_per_round": ratios, "cpu_ratio_median": statistics.median(ratios),
            "wall_ratio_per_round": wall_ratios, "wall_ratio_median": statistics.median(wall_ratios),
        }
    return summary


def markdown(report: dict) -> str:
    lines = [
        "# PaDiM inference cost: ShiftAD / anomalib " + report["anomalib_version"], "",
        f"Command: `{report['command']}` ({report['wall_s']:.0f} s). {report['images']} test images of "
        f"`{report['category']}` ({report['root']}), {report['image_size']} px, batch {report['batch_size']}, "
        "ResNet-18 random weights, one thread, each framework in its own process, rounds alternating. "
        f"Load average (1 min) before / after: {report['load_before']} / {report['load_after']} on "
        f"{os.cpu_count()} cores.", "",
        "| stage | ShiftAD CPU s/image | anomalib CPU s/image | CPU ratio per round | median CPU ratio | "
        "median wall ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage, row in report["summary"].items():
        def fmt(values):
            return " / ".join(f"{v:.3f}" for v in values)
        lines.append(f"| {stage} | {fmt(row['shiftad_cpu_s_per_image'])} | {fmt(row['anomalib_cpu_s_per_image'])} | "
                     f"{fmt(row['cpu_ratio_per_round'])} | **{row['cpu_ratio_median']:.2f}** | "
                     f"{row['wall_ratio_median']:.2f} |")
    lines += ["", "Test metrics computed:", *[f"- {fw}: {text}" for fw, text in TEST_METRICS.items()], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help="MVTec-AD-layout folder (default: the embedded surfaces build)")
    parser.add_argument("--category", default="brick")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--peer-python", default="/work/peer-venv/bin/python",
                        help="a Python with anomalib installed (kept out of ShiftAD's environment)")
    parser.add_argument("--out", type=Path, help="writes <out>.json and <out>.md")
    parser.add_argument("--profile", action="store_true",
                        help="with --worker shiftad: where the test loop's CPU time goes (cProfile)")
    args = parser.parse_args()
    if args.worker:
        import torch
        torch.set_num_threads(1)
        result = (shiftad_worker if args.worker == "shiftad" else anomalib_worker)(args)
        print(json.dumps(result))
        return
    if args.root is None:
        sys.path.insert(0, str(REPO))
        from datamodules.surfaces import default_embedded_root
        args.root = default_embedded_root("surfaces")
    import tempfile
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="inference_speed_") as scratch:
        for index in range(args.rounds):
            row = {}
            for framework in FRAMEWORKS:
                python = sys.executable if framework == "shiftad" else args.peer_python
                row[framework] = run_worker(framework, python, args, Path(scratch) / framework)
                print(f"round {index + 1} {framework}: " + ", ".join(
                    f"{stage} {per_image(row[framework], stage, 'cpu_s'):.4f} CPU s/image" for stage in args.stages),
                    flush=True)
            rounds.append(row)
    version = subprocess.run([args.peer_python, "-c", "import anomalib; print(anomalib.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    report = {"command": "python " + " ".join(sys.argv), "anomalib_version": version, "root": str(args.root),
              "category": args.category, "image_size": args.image_size, "batch_size": args.batch_size,
              "images": rounds[0]["shiftad"]["test"]["images"], "load_before": round(load_before, 2),
              "load_after": round(os.getloadavg()[0], 2), "wall_s": time.perf_counter() - started,
              "test_metrics": TEST_METRICS, "rounds": rounds, "summary": summarise(rounds, args.stages)}
    print(markdown(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    main()
