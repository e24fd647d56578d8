"""``cli.py export`` (issue 18, item 3): ONNX, torch.export and TorchScript files that onnxruntime / torch run
with the scores of the PyTorch module, ``model.json``, and the errors of a format or an op that cannot be
exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from cli import main
from tests.methods import QUIET, config, meta_comparer_args
from tests.test_real_target import NO_SHIFT, embedded_line_b
from tests.toy import ToyDataModule, ToyDetector

RTOL = 1e-4  # the parity bound, relative to the scale of the scores / of the map


def padim(root: Path, runs: Path) -> list[str]:
    return [*config("padim/padim_surfaces.yaml"), *QUIET, "--data.init_args.source.root", str(root),
            "--data.init_args.image_size", "32", "--data.init_args.resize_size", "null",
            "--model.init_args.num_features", "8", "--run.root", str(runs)]


def csflow(root: Path, runs: Path) -> list[str]:
    return [*config("csflow/source_surfaces.yaml"), *QUIET, "--data.init_args.source.root", str(root),
            "--data.init_args.image_size", "64", "--model.init_args.image_size", "64",
            "--model.init_args.hidden_channels", "8", "--model.init_args.kernel_sizes", "[3]",
            "--trainer.max_steps", "2", "--trainer.check_val_every_n_epoch", "1", "--run.root", str(runs)]


def densehybrid(root: Path, runs: Path) -> list[str]:
    # image_score_quantile < 1: torch.quantile in the graph
    return [*config("densehybrid/surfaces.yaml"), *QUIET, "--data.init_args.source.root", str(root),
            "--data.init_args.image_size", "32", "--model.init_args.negatives.size", "24",
            "--model.init_args.negatives.segmentation", "slic", "--model.init_args.negatives.patch_size", "16",
            "--model.init_args.decoder_channels", "16", "--model.init_args.image_score_quantile", "0.99",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--run.root", str(runs)]


METHODS = {"padim": padim, "csflow": csflow, "densehybrid": densehybrid}


@pytest.fixture(scope="module")
def fitted(surfaces_root, tmp_path_factory) -> dict[str, Path]:
    """A tiny fitted checkpoint of each method, through ``cli.py fit``."""
    runs = tmp_path_factory.mktemp("export_runs")
    checkpoints = {}
    for name, arguments in METHODS.items():
        main(["fit", *arguments(surfaces_root, runs)])
        checkpoints[name] = next(runs.glob(f"{name}/*/version_0/checkpoints/last.ckpt"))
    return checkpoints


def export(arguments: list[str], checkpoint: Path, fmt: str, out: Path):
    return main(["export", *arguments, "--ckpt_path", str(checkpoint), "--export.format", fmt,
                 "--export.out", str(out)])


def pytorch_outputs(module, images: torch.Tensor) -> list[np.ndarray]:
    """What ``predict`` computes for these images, from the PyTorch module."""
    with torch.no_grad():
        scores, maps = module.anomaly_scores(images)
        calibration = module.calibration
        outputs = (scores, calibration.normalise_image(scores), maps, calibration.normalise_pixel(maps))
    return [t.float().numpy() for t in outputs]


def assert_parity(exported: list[np.ndarray], expected: list[np.ndarray]) -> None:
    names = ("score", "normalised_score", "anomaly_map", "normalised_map")
    for name, out, ref in zip(names, exported, expected, strict=True):
        assert out.shape == ref.shape, name
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()), err_msg=name)


def some_test_images(cli) -> torch.Tensor:
    """Five of the DataModule's test images (normal and defective), a batch size the graph was not traced with."""
    dataset = cli.datamodule.test_dataset
    return torch.stack([dataset[index]["image"] for index in range(5)])


@pytest.mark.parametrize("method", list(METHODS))
def test_onnx_export_runs_in_onnxruntime_with_the_pytorch_scores(method, fitted, surfaces_root, tmp_path):
    out = tmp_path / "onnx"
    cli = export(METHODS[method](surfaces_root, tmp_path / "runs"), fitted[method], "onnx", out)
    images = some_test_images(cli)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["score", "normalised_score", "anomaly_map", "normalised_map"]
    assert_parity(session.run(None, {"images": images.numpy()}), pytorch_outputs(cli.model, images))

    description = json.loads((out / "model.json").read_text())
    size = cli.datamodule.image_size
    assert description["method"] == method and description["format"] == "onnx" and description["opset"] == 18
    assert description["checkpoint"] == str(fitted[method].resolve())
    assert description["input"]["shape"] == ["batch", 3, size, size]
    assert description["preprocessing"]["image_size"] == size
    assert description["preprocessing"]["mean"] == [[0.5, 0.5, 0.5]]  # the packaged Lite0's, inside the model
    assert "INSIDE" in description["preprocessing"]["normalisation"]
    assert [o["name"] for o in description["outputs"]] == ["score", "normalised_score", "anomaly_map",
                                                          "normalised_map"]
    assert description["calibration"] == cli.model.calibration.summary()
    assert description["calibration"]["image_threshold"] is not None
    assert max(description["parity"]["max_relative_difference"].values()) < RTOL
    inside = json.loads(session.get_modelmeta().custom_metadata_map["model.json"])
    assert inside["calibration"] == description["calibration"]


@pytest.mark.parametrize("fmt, file", [("torchscript", "model.pt"), ("torch_export", "model.pt2")])
def test_torch_formats_round_trip(fmt, file, fitted, surfaces_root, tmp_path):
    out = tmp_path / fmt
    cli = export(padim(surfaces_root, tmp_path / "runs"), fitted["padim"], fmt, out)
    extra = {"model.json": ""}
    if fmt == "torchscript":
        loaded = torch.jit.load(str(out / file), map_location="cpu", _extra_files=extra)
    else:
        loaded = torch.export.load(str(out / file), extra_files=extra).module()
    images = some_test_images(cli)
    with torch.no_grad():
        outputs = [t.numpy() for t in loaded(images)]
    assert_parity(outputs, pytorch_outputs(cli.model, images))
    assert json.loads(extra["model.json"])["format"] == fmt
    assert json.loads((out / "model.json").read_text())["file"] == file


def test_the_default_folder_is_a_new_run_folder(fitted, surfaces_root, tmp_path):
    runs = tmp_path / "runs"
    main(["export", *padim(surfaces_root, runs), "--ckpt_path", str(fitted["padim"]), "--export.format",
          "torchscript"])
    (folder,) = runs.glob("padim/*/version_0")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.pt"]


def test_an_unknown_format_is_refused_by_name(fitted, surfaces_root, tmp_path):
    with pytest.raises(ValueError, match="export.format must be one of onnx, torchscript, torch_export, "
                                         "got 'openvino'"):
        export(padim(surfaces_root, tmp_path / "runs"), fitted["padim"], "openvino", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_needs_a_checkpoint_file(surfaces_root, tmp_path):
    with pytest.raises(ValueError, match="export needs --ckpt_path <checkpoint file>"):
        main(["export", *padim(surfaces_root, tmp_path / "runs"), "--export.out", str(tmp_path / "out")])


def test_the_meta_comparer_exports_with_its_reference_bank(surfaces_root, tmp_path):
    """ONNX holds the bank fitted on the held-out domain's references; a TorchScript trace of it is refused, as it
    does not follow another batch size."""
    arguments = meta_comparer_args(surfaces_root, tmp_path / "runs", {})
    main(["fit", *arguments, "--trainer.max_steps", "2"])
    checkpoint = next((tmp_path / "runs").glob("meta_comparer/*/version_0/checkpoints/last.ckpt"))
    cli = export(arguments, checkpoint, "onnx", tmp_path / "onnx")
    assert cli.model.calibration.domain == "target"  # thresholds from the references, not the source
    references = cli.datamodule.reference_images()
    images = torch.cat([references[:2], some_test_images(cli)[:3]])
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert_parity(session.run(None, {"images": images.numpy()}), pytorch_outputs(cli.model, images))
    with pytest.raises(RuntimeError, match=r"meta_comparer: the torchscript file does not reproduce the PyTorch "
                                           r"outputs on a batch of 3 images \(traced with 2\).*Use --export.format onnx"):
        export(arguments, checkpoint, "torchscript", tmp_path / "torchscript")
    assert not (tmp_path / "torchscript" / "model.pt").exists()


class TriangularSolveDetector(ToyDetector):
    """A detector whose scoring uses an op ONNX lacks (a triangular solve)."""

    method_name = "triangular"

    def anomaly_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lower = torch.eye(3) + torch.tril(torch.full((3, 3), 0.1), diagonal=-1)
        solved = torch.linalg.solve_triangular(lower, images.flatten(2), upper=False)
        maps = (self.net(images) - solved.view_as(images)).pow(2).mean(1)
        return maps.flatten(1).amax(1), maps


class SizedToyData(ToyDataModule):
    image_size, resize_size = 16, None


def test_an_op_onnx_lacks_is_named_and_the_torch_formats_offered(tmp_path):
    toy = ["--model", f"{__name__}.TriangularSolveDetector", "--data", f"{__name__}.SizedToyData", *QUIET,
           "--run.wandb", "false", "--run.root", str(tmp_path / "runs")]
    main(["fit", *toy, "--trainer.max_steps", "1"])
    checkpoint = next((tmp_path / "runs").glob("triangular/*/version_0/checkpoints/last.ckpt"))
    with pytest.raises(RuntimeError, match=r"triangular: cannot export to ONNX: ONNX has no conversion of "
                                           r"aten::linalg_solve_triangular\. Use --export.format torch_export"):
        export(toy, checkpoint, "onnx", tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "model.onnx").exists()
    export(toy, checkpoint, "torch_export", tmp_path / "torch_export")  # the offered way works
    parity = json.loads((tmp_path / "torch_export" / "model.json").read_text())["parity"]
    assert max(parity["max_relative_difference"].values()) < RTOL


def test_the_readme_onnxruntime_snippet_runs_as_written(fitted, surfaces_root, tmp_path, monkeypatch, capsys):
    """README's "Use a trained model" Python lines, run unchanged beside a PaDiM ONNX export, print the decision
    and the score PyTorch gives the same file."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = readme.split("Running it needs only onnxruntime:\n\n```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.strip().splitlines()) == 5
    cli = export(padim(surfaces_root, tmp_path / "runs"), fitted["padim"], "onnx", tmp_path / "export")
    sample = cli.datamodule.test_dataset[0]
    (tmp_path / "part.png").write_bytes(Path(sample["path"]).read_bytes())
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    decision, score = capsys.readouterr().out.split()
    with torch.no_grad():
        expected = float(cli.model.anomaly_scores(sample["image"][None])[0][0])
    assert decision in ("normal", "anomalous")
    assert float(score) == pytest.approx(expected, rel=1e-3)


def test_a_recalibrated_densehybrid_exports_the_statistics_it_scores_with(fitted, surfaces_root, surfaces_line_b_root,
                                                                        tmp_path):
    """``export`` runs ``prepare_scoring``: the graph holds the BatchNorm statistics moved toward the target shots."""
    arguments = [*densehybrid(surfaces_root, tmp_path / "runs"), *embedded_line_b(surfaces_line_b_root), *NO_SHIFT,
                 *config("densehybrid/target_recalibration.yaml"), "--data.init_args.target_shots", "2"]
    out = tmp_path / "onnx"
    cli = export(arguments, fitted["densehybrid"], "onnx", out)
    module = cli.model
    assert module.source_statistics is not None  # the recalibration ran before the export
    images = some_test_images(cli)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"images": images.numpy()})
    assert_parity(exported, pytorch_outputs(module, images))
    state = module.model.state_dict()
    # line B's shots are far from the source here: the heads' 2 BatchNorms (freeze all) are updated
    assert all(not torch.equal(state[key], value) for key, value in module.source_statistics.items())
    module.model.load_state_dict(module.source_statistics, strict=False)  # the checkpoint's statistics
    assert not np.allclose(exported[0], pytorch_outputs(module, images)[0])


def test_a_csflow_recalibrated_through_its_extractor_exports_the_scale_statistics(fitted, surfaces_root,
                                                                                 surfaces_line_b_root, tmp_path):
    """The graph runs each scale through the extractor with that scale's target statistics."""
    arguments = [*csflow(surfaces_root, tmp_path / "runs"), *embedded_line_b(surfaces_line_b_root), *NO_SHIFT,
                 *config("csflow/target_recalibration_extractor.yaml"), "--data.init_args.target_shots", "2",
                 "--model.init_args.target_recalibration.safety", "false"]  # kept whatever the tiny flow separates
    out = tmp_path / "onnx"
    cli = export(arguments, fitted["csflow"], "onnx", out)
    module = cli.model
    assert module.model.use_scale_statistics
    images = some_test_images(cli)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"images": images.numpy()})
    assert_parity(exported, pytorch_outputs(module, images))
    module.model.use_scale_statistics = False  # the extractor's own statistics
    assert not np.allclose(exported[0], pytorch_outputs(module, images)[0])
