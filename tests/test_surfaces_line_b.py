"""The embedded real pair: surfaces (line a) and surfaces_line_b, and the probe that measures its cost."""

import dataclasses
import json

import cv2
import numpy as np
import pytest

from benchmarks.probe_surfaces import main as probe_main
from datamodules.readers import check_dataset_name, read_category
from datamodules.surfaces import (
    DEFECT_TYPES,
    EMBEDDED_DATASETS,
    MARKER,
    SURFACES_CATEGORIES,
    SurfacesSpec,
    default_embedded_root,
    ensure_embedded,
)
from tests.conftest import TINY_SURFACES

# The default spec's digest names the cache folder of every published surfaces number.
PUBLISHED_SURFACES_DIGEST = "b40db9204a49"


def _gray(path: str) -> np.ndarray:
    return cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float32)


def _detail(image: np.ndarray) -> np.ndarray:
    """The image minus its smooth part: texture, free of exposure, white balance and illumination."""
    return image - cv2.GaussianBlur(image, (0, 0), 4)


def test_line_b_has_the_layout_categories_and_split_sizes_of_its_spec(surfaces_line_b_root):
    spec = json.loads((surfaces_line_b_root / MARKER).read_text())["spec"]
    assert spec == {**dataclasses.asdict(TINY_SURFACES), "categories": list(SURFACES_CATEGORIES), "line": "b"}
    check_dataset_name("surfaces_line_b")
    for category in SURFACES_CATEGORIES:
        samples = read_category("surfaces_line_b", surfaces_line_b_root, category)
        assert len(samples.train) == spec["train_good"]
        assert sum(s.label == 0 for s in samples.test) == spec["test_good"]
        defects = [s for s in samples.test if s.label == 1]
        assert sorted(s.defect_type for s in defects) == sorted(DEFECT_TYPES)
        for sample in defects:
            mask = cv2.imread(sample.mask_path, cv2.IMREAD_GRAYSCALE)
            assert mask.shape == (64, 64) and 0.002 <= (mask > 0).mean() <= 0.15, sample.mask_path


def test_line_b_images_are_not_a_function_of_line_a_images(surfaces_root, surfaces_line_b_root):
    # Line a's image at the same index, blurred like line b's optics, shares no texture detail with the
    # line-b image: other surface content, not line a under another camera.
    for category in SURFACES_CATEGORIES:
        line_a = read_category("surfaces", surfaces_root, category).train
        line_b = read_category("surfaces_line_b", surfaces_line_b_root, category).train
        for a, b in zip(line_a[:3], line_b[:3], strict=True):
            blurred_a = _detail(cv2.GaussianBlur(_gray(a.image_path), (0, 0), 64 / 256))
            correlation = np.corrcoef(blurred_a.ravel(), _detail(_gray(b.image_path)).ravel())[0, 1]
            assert abs(correlation) < 0.5, (category, a.image_path, b.image_path, correlation)


def test_line_a_digest_is_unchanged_and_each_line_has_its_own_cache(tmp_path, monkeypatch):
    assert SurfacesSpec().digest() == PUBLISHED_SURFACES_DIGEST
    assert SurfacesSpec(line="a").digest() == PUBLISHED_SURFACES_DIGEST
    assert SurfacesSpec(line="b").digest() != PUBLISHED_SURFACES_DIGEST
    monkeypatch.setenv("SHIFTAD_CACHE", str(tmp_path))
    assert EMBEDDED_DATASETS == ("surfaces", "surfaces_line_b")
    assert default_embedded_root("surfaces") == tmp_path / "surfaces" / PUBLISHED_SURFACES_DIGEST
    assert default_embedded_root("surfaces_line_b") == tmp_path / "surfaces_line_b" / SurfacesSpec(line="b").digest()


def test_unknown_line_and_dataset_are_clear_errors():
    with pytest.raises(ValueError, match="unknown surfaces line 'c'; valid lines: 'a' \\(surfaces\\), 'b'"):
        SurfacesSpec(line="c")
    with pytest.raises(ValueError, match="'mvtec' is not an embedded dataset; embedded: surfaces, surfaces_line_b"):
        default_embedded_root("mvtec")


def test_ensure_embedded_refuses_a_build_of_the_other_line(surfaces_root, surfaces_line_b_root):
    ensure_embedded("surfaces", surfaces_root)  # already built: nothing to do
    ensure_embedded("surfaces_line_b", surfaces_line_b_root)
    with pytest.raises(ValueError, match="dataset='surfaces_line_b' expects a build of surfaces line 'b' but "
                                         f"'{surfaces_root}' holds line 'a'"):
        ensure_embedded("surfaces_line_b", surfaces_root)


def test_probe_runs_end_to_end_on_tiny_builds(surfaces_root, surfaces_line_b_root, tmp_path):
    probe_main(["--root", str(surfaces_root), "--target-root", str(surfaces_line_b_root), "--out", str(tmp_path / "probe"),
                "--categories", "wood", "--shifts", "gray", "--image-size", "64"])
    report = json.loads((tmp_path / "probe.json").read_text())
    assert set(report["per_category"]["wood"]) == {"none", "gray", "source->target", "target->target"}
    pair = report["real_pair"]
    wood = report["per_category"]["wood"]
    assert pair["cost"]["wood"] == pytest.approx(wood["target->target"] - wood["source->target"])
    assert "mean_drop" in report and "mean_cost" in pair
    markdown = (tmp_path / "probe.md").read_text()
    assert "| wood |" in markdown and "surfaces -> surfaces_line_b" in markdown
