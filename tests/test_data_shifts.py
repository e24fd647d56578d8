import pickle

import cv2
import numpy as np
import pytest
import torch

from datamodules.dataset import AnomalyDataset
from datamodules.readers import read_category
from datamodules.shifts import BRG_ORDER, COLJIT_FACTORS, SHIFT_NAMES, STYLE_SHIFTS, Shift, check_shift_name


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:64]
    rng = np.random.default_rng(0)
    return np.stack([xx * 4, yy * 5, rng.integers(0, 256, (48, 64))], axis=2).astype(np.uint8)


@pytest.mark.parametrize("name", SHIFT_NAMES)
def test_shift_is_deterministic_and_keeps_shape(image, name):
    shift = Shift(name)
    first, second = shift(image.copy()), pickle.loads(pickle.dumps(shift))(image.copy())
    assert first.shape == image.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    if name != "none":
        assert not np.array_equal(first, image)


def test_gray_brg_and_coljit_do_what_they_say(image):
    gray = Shift("gray")(image)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    np.testing.assert_array_equal(Shift("brg")(image), image[..., list(BRG_ORDER)])
    pure_green = np.zeros((2, 2, 3), np.uint8)
    pure_green[..., 1] = 200
    hsv = cv2.cvtColor(Shift("coljit")(pure_green).astype(np.float32) / 255, cv2.COLOR_RGB2HSV)[0, 0]
    assert hsv[0] == pytest.approx((120 * COLJIT_FACTORS[0]) % 360, abs=2)
    assert hsv[1] == pytest.approx(COLJIT_FACTORS[1], abs=0.02)
    assert hsv[2] == pytest.approx(200 / 255 * COLJIT_FACTORS[2], abs=0.02)


@pytest.mark.parametrize("name", STYLE_SHIFTS)
def test_style_shifts_keep_the_full_intensity_range(image, name):
    # albumentations 2.0.8's PDA turns uint8 images black; the shift must not.
    shifted = Shift(name)(image)
    assert 40 < shifted.mean() < 215 and shifted.std() > 20


def test_unknown_shift_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown shift 'sepia'.*gray, brg, coljit"):
        Shift("sepia")
    assert check_shift_name(None) == "none"


@pytest.mark.parametrize("name", STYLE_SHIFTS)
def test_style_reference_can_be_overridden(image, tmp_path, name):
    reference = tmp_path / "style.png"
    cv2.imwrite(str(reference), np.full((32, 32, 3), (30, 200, 90), np.uint8))
    assert not np.array_equal(Shift(name, str(reference))(image), Shift(name)(image))
    with pytest.raises(FileNotFoundError, match="style reference .* not found: .*nope.png"):
        Shift(name, str(tmp_path / "nope.png"))


def test_shift_reaches_images_not_masks(surfaces_root):
    test = read_category("surfaces", surfaces_root, "brick").test
    index = next(i for i, s in enumerate(test) if s.label == 1)
    plain = AnomalyDataset(test, ["brick"], Shift(None), 32)[index]
    for name in SHIFT_NAMES[1:]:
        shifted = AnomalyDataset(test, ["brick"], Shift(name), 32)[index]
        assert torch.equal(shifted["mask"], plain["mask"]) and plain["mask"].sum() > 0
        assert not torch.equal(shifted["image"], plain["image"])
