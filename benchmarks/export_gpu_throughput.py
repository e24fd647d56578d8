"""Predict throughput of each exported format on a GPU (issue 18): each method fitted briefly and exported on the
CPU through ``cli.py``, as ``benchmarks/export_parity.py`` does, then the exported file and the PyTorch module
timed on CUDA over the test images (inputs already on the GPU, batches of ``--batch-size``, 3 warm-up batches,
3 passes). A ``torch.export`` file traced on the CPU is moved with ``torch.export.passes.move_to_device_pass``.
ONNX runs with onnxruntime's CUDA provider when it is installed, else on the CPU (said in the row).

    python benchmarks/export_gpu_throughput.py --out runs/export_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.export.passes import move_to_device_pass

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from benchmarks.export_parity import QUIET, images_per_second, method_args, test_images  # noqa: E402
from cli import main  # noqa: E402
from lightning_modules.components.export import FILE_NAMES, FORMATS, INPUT_NAME, InferenceModel  # noqa: E402


def cuda_images_per_second(run, images: torch.Tensor, batch_size: int) -> float:
    # 3 warm-up batches: TorchScript's profiling executor optimises over its first calls
    return round(images_per_second(run, images, batch_size, repeats=3, warm_up=3,
                                   synchronize=torch.cuda.synchronize), 1)


def onnx_runner(path: Path):
    import onnxruntime
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in onnxruntime.get_available_providers()]
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    return session.get_providers()[0], lambda chunk: session.run(None, {INPUT_NAME: chunk.cpu().numpy()})


def measure(method: str, args: argparse.Namespace, cuda: torch.device) -> dict:
    arguments = [*method_args(method, args.image_size, args.category, args.steps), *QUIET, "--run.root", str(args.runs)]
    main(["fit", *arguments])
    checkpoint = max(args.runs.glob(f"{method}/*/version_*/checkpoints/last.ckpt"), key=os.path.getmtime)
    row: dict[str, float | str] = {}
    for fmt in FORMATS:
        out = args.runs / "exports" / method / fmt
        try:
            cli = main(["export", *arguments, "--ckpt_path", str(checkpoint), "--export.format", fmt,
                        "--export.out", str(out)])
            images = test_images(cli.datamodule).to(cuda)
            with torch.no_grad():
                if "pytorch" not in row:
                    row["pytorch"] = cuda_images_per_second(InferenceModel(cli.model).to(cuda).eval(), images, args.batch_size)
                path = out / FILE_NAMES[fmt]
                if fmt == "onnx":
                    provider, run = onnx_runner(path)
                    row[f"onnx ({provider})"] = cuda_images_per_second(run, images, args.batch_size)
                elif fmt == "torchscript":
                    row[fmt] = cuda_images_per_second(torch.jit.load(str(path), map_location=cuda), images, args.batch_size)
                else:  # traced on the CPU: its graph's tensors move with the pass made for that
                    program = move_to_device_pass(torch.export.load(str(path)), cuda)
                    row[fmt] = cuda_images_per_second(program.module(), images, args.batch_size)
        except Exception as error:  # a format that does not run on the GPU is a result, not a crash
            row[fmt] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        print(method, fmt, row, flush=True)
    return {"images": len(images), "images_per_second": row}


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["padim", "csflow", "densehybrid"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--category", default="brick")
    parser.add_argument("--steps", type=int, default=10, help="training steps of CS-Flow and DenseHybrid")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=Path, default=Path("runs/export_gpu"), help="folder of the fits and exports")
    parser.add_argument("--out", type=Path, required=True, help="writes this JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark times the exported files on a GPU")
    cuda = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(cuda), "batch_size": args.batch_size, "image_size": args.image_size,
               "methods": {}}
    for method in args.methods:
        results["methods"][method] = measure(method, args, cuda)
        args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main_()
