"""Export of a fitted model for inference without ShiftAD's code: ONNX (onnxruntime), TorchScript or a
``torch.export`` program, and ``model.json``.

The exported graph takes float images [B, 3, H, W] in [0, 1], RGB, at the DataModule's ``image_size`` (B is
free) and returns what ``predict`` computes: ``score`` (raw) and ``normalised_score`` (in [0, 1], the image
threshold at 0.5), plus for the detectors ``anomaly_map`` (raw, [B, H, W]) and ``normalised_map``. The
backbone's mean/std normalisation, the fitted statistics (PaDiM's Gaussians, the CS-Flow flow, DenseHybrid's
heads, the reference banks fitted by ``prepare_scoring``) and the score normalisation are inside the graph;
``model.json`` beside it (and inside the file: ONNX metadata, or an extra file of the TorchScript / torch.export
archive) describes the input (resize, size, mean/std), the outputs and the thresholds.

After writing, the file is run on a batch of another size than the one it was traced with and compared with
the PyTorch module; the largest relative differences go into ``model.json`` (``parity``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_modules.components.backbone import ImageNormalizer

FORMATS = ("onnx", "torchscript", "torch_export")
FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt", "torch_export": "model.pt2"}
#: what a failed ONNX export offers instead
OTHER_FORMATS = ("--export.format torch_export (torch.export.load(path).module() runs it) or --export.format "
                 "torchscript (torch.jit.load; deprecated by PyTorch)")
INPUT_NAME = "images"
SCORE_OUTPUTS = ("score", "normalised_score")
MAP_OUTPUTS = ("anomaly_map", "normalised_map")
#: the batch the graph is traced with, and the (other) batch size it is checked on
TRACE_BATCH, CHECK_BATCH = 2, 3
#: largest relative difference from the PyTorch outputs a written file may have (the issue's parity bound)
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """A model that cannot be written in the asked format; the message names the method, the op and what to use."""


@dataclass
class ExportSpec:
    """``export`` options.

    Args:
        format: ``onnx`` (run with onnxruntime), ``torch_export`` (``torch.export.load(path).module()``) or
            ``torchscript`` (``torch.jit.load``); none needs ShiftAD's code to run.
        out: folder for the model file and ``model.json``; default: the run folder of this export.
        opset: ONNX opset version.
    """

    format: str = "onnx"
    out: str | None = None
    opset: int = 18

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"export.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.opset < 18:
            raise ValueError(f"export.opset must be >= 18 (antialiased resize of CS-Flow's scales), got {self.opset}")


class InferenceModel(nn.Module):
    """A fitted ShiftAD module as one forward pass: images -> (score, normalised_score[, anomaly_map,
    normalised_map]), the values ``predict_step`` returns."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not hasattr(module, "calibration"):
            raise ExportError(f"{type(module).__name__} scores no images (it has no calibrated score); export a "
                              f"detector or a defect classifier")
        self.module = module
        self.with_maps = hasattr(module, "anomaly_scores")
        if self.with_maps and not module.calibration.has_pixel_threshold:
            raise ExportError(f"{type(module).__name__}: the calibration has no pixel threshold, so the anomaly map "
                              f"cannot be normalised; fit one (validation data with maps) or pass "
                              f"--model.init_args.threshold.pixel_threshold <map value> with method manual")

    @property
    def output_names(self) -> tuple[str, ...]:
        return SCORE_OUTPUTS + (MAP_OUTPUTS if self.with_maps else ())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calibration = self.module.calibration
        if not self.with_maps:  # the domain classifiers: the defect probability of a target image
            scores = self.module.defect_probability(images, "target")
            return scores, calibration.normalise_image(scores)
        scores, maps = self.module.anomaly_scores(images)
        scores, maps = scores.float(), maps.float()
        return scores, calibration.normalise_image(scores), maps, calibration.normalise_pixel(maps)


def example_images(image_size: int, batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def failed_op(error: BaseException) -> str | None:
    """The aten op an ONNX export failed on, from the exporter's messages (``aten.linalg_solve_triangular``)."""
    while error is not None:
        found = re.search(r"aten[.:]+([A-Za-z0-9_]+)", str(error))
        if found:
            return f"aten::{found.group(1)}"
        error = error.__cause__ or error.__context__
    return None


def write_onnx(model: InferenceModel, example: torch.Tensor, path: Path, opset: int, description: dict) -> None:
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as error:
        raise ExportError(f"export.format onnx needs the onnx and onnxscript packages ({error}): "
                          f"pip install -e '.[export]', or use {OTHER_FORMATS}") from error
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=list(model.output_names), dynamic_shapes=dynamic_batch(),
                          external_data=False, verbose=False)
    except Exception as error:  # the exporter raises its own classes from several stages
        path.unlink(missing_ok=True)
        op = failed_op(error)
        # A missing ONNX op leaves torch.export fine; a graph torch.export cannot trace leaves TorchScript.
        what, other = ((f"ONNX has no conversion of {op}", OTHER_FORMATS) if op else
                       (f"the ONNX exporter failed ({type(error).__name__})", "--export.format torchscript"))
        raise ExportError(f"{description['method']}: cannot export to ONNX: {what}. Use {other} instead. "
                          f"Exporter message: {str(error).splitlines()[0]}") from error
    # model.json also inside the file, so that the thresholds travel with it
    exported = onnx.load(str(path))
    onnx.helper.set_model_props(exported, {"model.json": json.dumps(description)})
    onnx.save(exported, str(path))


def dynamic_batch() -> tuple[dict, ...]:
    return ({0: torch.export.Dim("batch", min=1)},)


def write_torch_export(model: InferenceModel, example: torch.Tensor, path: Path, description: dict) -> None:
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic_batch())
    except Exception as error:  # torch.export raises many classes (guards, unsupported Python)
        raise ExportError(f"{description['method']}: torch.export cannot trace it ({type(error).__name__}: "
                          f"{str(error).splitlines()[0]}); use --export.format torchscript") from error
    torch.export.save(program, str(path), extra_files={"model.json": json.dumps(description)})


def write_torchscript(model: InferenceModel, example: torch.Tensor, path: Path, description: dict) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_trace=False, strict=False)
        # Frozen: only the tensors the forward pass reads are kept (not PaDiM's float64 fit sums).
        frozen = torch.jit.freeze(traced, optimize_numerics=False)
    torch.jit.save(frozen, str(path), _extra_files={"model.json": json.dumps(description)})


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> list[np.ndarray]:
    """The exported file's outputs on ``images``, run the way a user runs it (onnxruntime on CPU, torch.jit,
    torch.export)."""
    if fmt != "onnx":
        loaded = torch.jit.load(str(path), map_location="cpu") if fmt == "torchscript" else \
            torch.export.load(str(path)).module()
        with torch.no_grad():
            return [t.numpy() for t in loaded(images)]
    try:
        import onnxruntime
    except ImportError as error:
        raise ExportError(f"checking the ONNX file needs onnxruntime ({error}): pip install -e '.[export]'") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: images.numpy()})


def relative_difference(exported: np.ndarray, reference: np.ndarray) -> float:
    """max |exported - reference| / max |reference| (the scale of a map or of a batch's scores); inf when the
    shapes differ."""
    if exported.shape != reference.shape:
        return float("inf")
    scale = float(np.abs(reference).max())
    return float(np.abs(exported - reference).max()) / (scale if scale > 0 else 1.0)


def mean_std(module: nn.Module) -> dict:
    """The backbone normalisation(s) inside the model (one per feature extractor)."""
    found = [m.mean_std() for m in module.modules() if isinstance(m, ImageNormalizer)]
    unique = list(dict.fromkeys(found))
    return {"mean": [list(mean) for mean, _ in unique], "std": [list(std) for _, std in unique]}


def describe(module: nn.Module, model: InferenceModel, datamodule, checkpoint: str, spec: ExportSpec) -> dict:
    image_size = int(datamodule.image_size)
    resize_size = getattr(datamodule, "resize_size", None)
    resize = (f"resize to {image_size}x{image_size} (OpenCV INTER_AREA)" if resize_size is None else
              f"resize to {resize_size}x{resize_size} (OpenCV INTER_AREA), then centre-crop {image_size}x{image_size}")
    shapes = {"score": ["batch"], "normalised_score": ["batch"],
              "anomaly_map": ["batch", image_size, image_size], "normalised_map": ["batch", image_size, image_size]}
    return {
        "method": getattr(module, "method_name", type(module).__name__),
        "class_path": f"{type(module).__module__}.{type(module).__name__}",
        "checkpoint": str(Path(checkpoint).resolve()),
        "format": spec.format,
        "file": FILE_NAMES[spec.format],
        "opset": spec.opset if spec.format == "onnx" else None,
        "torch": torch.__version__,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, image_size, image_size], "dtype": "float32",
                  "channels": "RGB", "range": [0.0, 1.0]},
        "preprocessing": {
            "image_size": image_size, "resize_size": resize_size,
            "steps": ["read as RGB (8-bit)", resize, "divide by 255 (float32 in [0, 1])", "channels first"],
            **mean_std(module),
            "normalisation": "(x - mean) / std is applied INSIDE the model: feed [0, 1] images, not normalised ones",
        },
        "outputs": [{"name": name, "shape": shapes[name]} for name in model.output_names],
        "decision": "defect when score > calibration.image_threshold, i.e. normalised_score > 0.5; a pixel is "
                    "defective when normalised_map > 0.5",
        "calibration": module.calibration.summary(),
        "data": dict(getattr(datamodule, "describe", dict)()),
    }


def export_model(module: nn.Module, datamodule, checkpoint: str, spec: ExportSpec, out_dir: Path) -> Path:
    """Writes ``out_dir/model.onnx|model.pt|model.pt2`` and ``out_dir/model.json`` for a fitted module whose scoring is
    ready (checkpoint loaded, ``prepare_scoring`` and thresholds done); returns the model file."""
    image_size = getattr(datamodule, "image_size", None)
    if not isinstance(image_size, int):
        raise ExportError(f"export needs the image size of the model's input: {type(datamodule).__name__} has no "
                          f"integer image_size (a ShiftAD DataModule's data.init_args.image_size)")
    module.eval()
    model = InferenceModel(module).eval()
    example = example_images(image_size, TRACE_BATCH, seed=0)
    check = example_images(image_size, CHECK_BATCH, seed=1)
    with torch.no_grad():
        model(example)  # derives cached statistics (PaDiM's Gaussians) before tracing
        expected = [t.numpy() for t in model(check)]
    description = describe(module, model, datamodule, checkpoint, spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAMES[spec.format]
    if spec.format == "onnx":
        write_onnx(model, example, path, spec.opset, description)
    elif spec.format == "torch_export":
        write_torch_export(model, example, path, description)
    else:
        write_torchscript(model, example, path, description)
    exported = run_exported(path, spec.format, check)
    differences = {name: relative_difference(out, ref)
                   for name, out, ref in zip(model.output_names, exported, expected, strict=True)}
    wrong = {name: value for name, value in differences.items() if not value <= PARITY_TOLERANCE}
    if wrong:
        path.unlink()
        others = ", ".join(f"--export.format {other}" for other in FORMATS if other != spec.format)
        listed = ", ".join(f"{name} {value:.2g}" for name, value in wrong.items())
        raise ExportError(f"{description['method']}: the {spec.format} file does not reproduce the PyTorch outputs "
                          f"on a batch of {CHECK_BATCH} images (traced with {TRACE_BATCH}): max relative difference "
                          f"{listed} > {PARITY_TOLERANCE:g}; the file is not written. Use {others}")
    description["parity"] = {
        "images": f"{CHECK_BATCH} uniform random images (the graph was traced with {TRACE_BATCH})",
        "max_relative_difference": differences,
    }
    description["file_bytes"] = path.stat().st_size
    (out_dir / "model.json").write_text(json.dumps(description, indent=2) + "\n")
    return path
