import hashlib
import json

import cv2
import pytest

from datamodules.preview import main as preview_main
from datamodules.readers import read_category
from datamodules.surfaces import (
    DEFECT_TYPES,
    MARKER,
    SURFACES_CATEGORIES,
    SurfacesSpec,
    default_surfaces_root,
    ensure_surfaces,
)
from tests.conftest import TINY_SURFACES


def digest_tree(root):
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def test_layout_counts_and_marker(surfaces_root):
    info = json.loads((surfaces_root / MARKER).read_text())
    assert info["spec"]["image_size"] == 64
    assert len(SURFACES_CATEGORIES) >= 5 and len(DEFECT_TYPES) >= 4
    for category in SURFACES_CATEGORIES:
        samples = read_category("surfaces", surfaces_root, category)
        assert len(samples.train) == TINY_SURFACES.train_good
        assert sum(s.label == 0 for s in samples.test) == TINY_SURFACES.test_good
        defects = [s for s in samples.test if s.label == 1]
        assert sorted(s.defect_type for s in defects) == sorted(DEFECT_TYPES)
        for sample in defects:
            mask = cv2.imread(sample.mask_path, cv2.IMREAD_GRAYSCALE)
            assert mask.shape == (64, 64)
            assert 0.002 <= (mask > 0).mean() <= 0.15, sample.mask_path


def test_build_is_deterministic_and_seeded(tmp_path):
    spec = SurfacesSpec(image_size=48, train_good=2, test_good=1, test_defects=5, categories=("wood", "grass"))
    first = digest_tree(ensure_surfaces(tmp_path / "a", spec))
    assert first == digest_tree(ensure_surfaces(tmp_path / "b", spec))
    other = digest_tree(ensure_surfaces(tmp_path / "c", SurfacesSpec(**{**spec.__dict__, "seed": 1})))
    assert first.keys() == other.keys() and first != other


def test_half_built_folder_is_never_used(tmp_path):
    spec = SurfacesSpec(image_size=32, train_good=1, test_good=1, test_defects=5, categories=("brick",))
    partial = tmp_path / "partial"
    (partial / "brick" / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=f"no complete surfaces build \\({MARKER} missing\\)"):
        ensure_surfaces(partial, spec)
    # A crashed build leaves only its hidden temporary folder, which a new build replaces.
    (tmp_path / f".fresh.building-{12345}").mkdir()
    root = ensure_surfaces(tmp_path / "fresh", spec)
    assert (root / MARKER).is_file() and (root / "brick" / "test" / "crack").is_dir()


def test_cache_location_follows_env_and_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIFTAD_CACHE", str(tmp_path))
    assert default_surfaces_root().parent == tmp_path / "surfaces"
    assert default_surfaces_root(SurfacesSpec(seed=3)) != default_surfaces_root()


def test_spec_rejects_unknown_categories():
    with pytest.raises(ValueError, match="unknown surfaces categories \\['marble'\\]"):
        SurfacesSpec(categories=("marble",))


@pytest.mark.parametrize(("dataset", "fixture"), [("surfaces", "surfaces_root"),
                                                  ("surfaces_line_b", "surfaces_line_b_root")])
def test_preview_writes_a_grid(request, dataset, fixture, tmp_path):
    out = preview_main(["--dataset", dataset, "--root", str(request.getfixturevalue(fixture)),
                        "--out", str(tmp_path / "grid.png"), "--image-size", "32", "--shifts", "none", "gray", "fda"])
    grid = cv2.imread(str(out))
    assert grid.shape[0] > 6 * 32 and grid.shape[1] > 3 * 32

