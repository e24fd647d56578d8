"""Export parity and CPU speed: each method fitted briefly through ``cli.py fit``, exported through ``cli.py export``
to ONNX, torch.export and TorchScript, then run on the DataModule's test images (target and source test splits) against the
PyTorch module.

For every output (score, normalised score, anomaly map, normalised map) it reports the largest difference relative
to the scale of the PyTorch values (max |exported - torch| / max |torch|, over all test images), the largest
elementwise relative difference of the raw scores, the file size, and images/s on one CPU thread (PyTorch,
onnxruntime, TorchScript) in batches of ``--batch-size``, with the load average beside it (the machine may be
shared). The fits are short: parity needs fitted weights, not good ones.

    python benchmarks/export_parity.py --image-size 128 --out docs/results/export_parity
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli import main  # noqa: E402
from lightning_modules.components.export import FILE_NAMES, FORMATS, INPUT_NAME, relative_difference  # noqa: E402

QUIET = ["--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--run.wandb", "false"]
OUTPUTS = ("score", "normalised_score", "anomaly_map", "normalised_map")


def method_args(method: str, image_size: int, category: str, steps: int) -> list[str]:
    data = ["--data.init_args.source.category", category, "--data.init_args.image_size", str(image_size)]
    if method == "padim":
        return ["--config", str(REPO / "configs/padim/padim_surfaces.yaml"), *data,
                "--data.init_args.resize_size", "null"]
    if method == "csflow":
        return ["--config", str(REPO / "configs/csflow/source_surfaces.yaml"), *data,
                "--model.init_args.image_size", str(image_size), "--trainer.max_steps", str(steps),
                "--trainer.check_val_every_n_epoch", "1"]
    if method == "densehybrid":
        return ["--config", str(REPO / "configs/densehybrid/surfaces.yaml"), *data,
                "--trainer.max_steps", str(steps)]
    raise ValueError(f"unknown method {method!r}; expected padim, csflow or densehybrid")


def test_images(datamodule) -> torch.Tensor:
    datasets = [datamodule.test_dataset, getattr(datamodule, "source_test_dataset", None)]
    return torch.stack([dataset[i]["image"] for dataset in datasets if dataset is not None
                        for i in range(len(dataset))])


def pytorch_outputs(module, images: torch.Tensor, batch_size: int) -> list[np.ndarray]:
    parts = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            scores, maps = module.anomaly_scores(chunk)
            calibration = module.calibration
            parts.append([t.float().numpy() for t in (scores, calibration.normalise_image(scores), maps,
                                                       calibration.normalise_pixel(maps))])
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def batched(run, images: torch.Tensor, batch_size: int) -> list[np.ndarray]:
    parts = [run(chunk) for chunk in images.split(batch_size)]
    return [np.concatenate(column) for column in zip(*parts, strict=True)]


def images_per_second(run, images: torch.Tensor, batch_size: int, repeats: int, warm_up: int = 1,
                      synchronize=lambda: None) -> float:
    """``synchronize`` waits for queued device work (``torch.cuda.synchronize`` on a GPU)."""
    for _ in range(warm_up):
        run(images[:batch_size])
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        for chunk in images.split(batch_size):
            run(chunk)
    synchronize()
    return repeats * len(images) / (time.perf_counter() - start)


def parity(exported: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    scores, torch_scores = exported[0], reference[0]
    elementwise = np.abs(scores - torch_scores) / np.maximum(np.abs(torch_scores), 1e-12)
    return {"max_relative_difference": {name: relative_difference(out, ref)
                                        for name, out, ref in zip(OUTPUTS, exported, reference, strict=True)},
            "max_elementwise_relative_difference_score": float(elementwise.max())}


def exported_runner(path: Path, fmt: str):
    """images -> outputs of the exported file, on one CPU thread."""
    if fmt != "onnx":
        loaded = (torch.jit.load(str(path), map_location="cpu") if fmt == "torchscript" else
                  torch.export.load(str(path)).module())

        def run(chunk: torch.Tensor) -> list[np.ndarray]:
            with torch.no_grad():
                return [t.numpy() for t in loaded(chunk)]
        return run
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda chunk: session.run(None, {INPUT_NAME: chunk.numpy()})


def measure(method: str, args: argparse.Namespace, runs: Path) -> dict:
    arguments = [*method_args(method, args.image_size, args.category, args.steps), *QUIET, "--run.root", str(runs)]
    start = time.perf_counter()
    main(["fit", *arguments])
    fit_seconds = time.perf_counter() - start
    checkpoint = max(runs.glob(f"{method}/*/version_*/checkpoints/last.ckpt"), key=os.path.getmtime)
    result = {"checkpoint": str(checkpoint), "fit_seconds": round(fit_seconds, 1), "formats": {}}
    torch.set_num_threads(1)
    for fmt in FORMATS:
        out = runs / "exports" / method / fmt
        start = time.perf_counter()
        cli = main(["export", *arguments, "--ckpt_path", str(checkpoint), "--export.format", fmt,
                    "--export.out", str(out)])
        export_seconds = time.perf_counter() - start
        torch.set_num_threads(1)
        module, images = cli.model, test_images(cli.datamodule)
        reference = pytorch_outputs(module, images, args.batch_size)
        path = out / FILE_NAMES[fmt]
        run = exported_runner(path, fmt)
        exported = batched(run, images, args.batch_size)
        load_before = os.getloadavg()[0]
        exported_speed = images_per_second(run, images, args.batch_size, args.repeats)
        torch_speed = images_per_second(partial(pytorch_outputs, module, batch_size=args.batch_size), images,
                                        args.batch_size, args.repeats)
        result["formats"][fmt] = {
            "file_bytes": path.stat().st_size, "export_seconds": round(export_seconds, 1), "images": len(images),
            **parity(exported, reference),
            "images_per_second_1_thread": {"exported": round(exported_speed, 2), "pytorch": round(torch_speed, 2)},
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        }
        print(method, fmt, json.dumps(result["formats"][fmt]), flush=True)
    return result


def markdown(results: dict, command: str) -> str:
    lines = [f"# Export parity and CPU speed ({results['image_size']} px, surfaces/{results['category']})", "",
             f"`{command}`", "",
             "Max relative difference = max |exported − PyTorch| / max |PyTorch| over all test images; images/s on "
             "one CPU thread, batch " f"{results['batch_size']}, on a shared machine (load average before/after "
             "each timing in the JSON).", "",
             "| method | format | size (MB) | score | normalised score | map | normalised map | score (elementwise) "
             "| exported img/s | PyTorch img/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, result in results["methods"].items():
        for fmt, row in result["formats"].items():
            diff = row["max_relative_difference"]
            speed = row["images_per_second_1_thread"]
            lines.append(f"| {method} | {fmt} | {row['file_bytes'] / 1e6:.1f} | "
                         + " | ".join(f"{diff[name]:.1e}" for name in OUTPUTS)
                         + f" | {row['max_elementwise_relative_difference_score']:.1e} | {speed['exported']:.1f} | "
                         f"{speed['pytorch']:.1f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["padim", "csflow", "densehybrid"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--category", default="brick")
    parser.add_argument("--steps", type=int, default=10, help="training steps of CS-Flow and DenseHybrid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="passes over the test images per timing")
    parser.add_argument("--runs", default="runs/export_parity", help="folder of the fits and exports")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = Path(args.runs)
    start = time.perf_counter()
    results = {"image_size": args.image_size, "category": args.category, "batch_size": args.batch_size,
               "torch": torch.__version__, "methods": {}}
    for method in args.methods:
        results["methods"][method] = measure(method, args, runs)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    if args.out:
        command = "python benchmarks/export_parity.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({**results, "command": command}, indent=2) + "\n")
        Path(f"{args.out}.md").write_text(markdown(results, command))
    return results


if __name__ == "__main__":
    run()
