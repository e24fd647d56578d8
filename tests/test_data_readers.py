import csv
import warnings

import cv2
import numpy as np
import pytest
import torch

from datamodules.dataset import AnomalyDataset
from datamodules.readers import read_category
from datamodules.shifts import Shift
from tests.conftest import FAKE_SIZE, write_image, write_mask


def load(samples, domain, size=32):
    return AnomalyDataset(samples, [domain], Shift(None), size)


def check_item(item, size=32):
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, size, size) and item["mask"].dtype == torch.float32
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert (item["mask"].sum() > 0) == (item["label"] == 1 and item["has_mask"])


def test_mvtec_layout(mvtec_root):
    samples = read_category("mvtec", mvtec_root, "bottle")
    assert len(samples.train) == 8 and all(s.label == 0 and s.defect_type == "good" for s in samples.train)
    assert sorted({s.defect_type for s in samples.test}) == ["crack", "good", "scratch"]
    assert sum(s.label for s in samples.test) == 4 and all(s.has_mask for s in samples.test)
    dataset = load(samples.test, "bottle")
    for item in (dataset[i] for i in range(len(dataset))):
        check_item(item)


def test_visa_csv_layout_binarises_masks(visa_root):
    samples = read_category("visa", visa_root, "pcb1")
    assert len(samples.train) == 8 and len(samples.test) == 6
    anomalous = [s for s in samples.test if s.label == 1]
    assert len(anomalous) == 3 and all(s.defect_type == "anomaly" and s.mask_path for s in anomalous)
    item = load(samples.test, "pcb1")[samples.test.index(anomalous[0])]
    check_item(item)
    assert item["mask"].mean() == pytest.approx(0.25, abs=0.03)  # mask value 3 -> 1


def test_btad_layout_with_bmp_images(btad_root):
    samples = read_category("btad", btad_root, "02")
    assert samples.train[0].image_path.endswith(".bmp")
    assert {s.defect_type for s in samples.test} == {"good", "ko"}
    ko = next(s for s in samples.test if s.label == 1)
    assert ko.mask_path.endswith(".png")
    check_item(load(samples.test, "02")[samples.test.index(ko)])


def test_folder_without_ground_truth_is_image_level_only(make_mvtec):
    root = make_mvtec(categories=("parts",), with_masks=False)
    samples = read_category("folder", root, "parts")
    assert not any(s.has_mask for s in samples.train + samples.test)
    item = load(samples.test, "parts")[len(samples.test) - 1]
    assert item["label"] == 1 and not item["has_mask"] and item["mask"].sum() == 0


def test_missing_root_and_category(tmp_path, mvtec_root):
    with pytest.raises(FileNotFoundError, match="mvtec root .*nowhere.* does not exist; expected <root>/<category>"):
        read_category("mvtec", tmp_path / "nowhere", "bottle")
    with pytest.raises(FileNotFoundError, match="category 'tire' not found .*available: bottle, carpet"):
        read_category("mvtec", mvtec_root, "tire")
    with pytest.raises(FileNotFoundError, match="split_csv/1cls.csv"):
        read_category("visa", tmp_path, "candle")
    with pytest.raises(ValueError, match="unknown dataset 'kitti'"):
        read_category("kitti", tmp_path, "x")


def test_empty_split(make_mvtec):
    root = make_mvtec(train=0)
    (root / "bottle" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty train split: no images .* in .*bottle/train/good"):
        read_category("mvtec", root, "bottle")


def test_mask_without_image(make_mvtec):
    root = make_mvtec()
    write_mask(root / "bottle" / "ground_truth" / "scratch" / "077_mask.png")
    with pytest.raises(FileNotFoundError, match="mask .*077_mask.png' has no matching image: expected .*scratch/077"):
        read_category("mvtec", root, "bottle")


def test_defect_image_without_mask(make_mvtec):
    root = make_mvtec()
    (root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="defect image .*crack/001.png' has no mask"):
        read_category("mvtec", root, "bottle")


def test_mask_of_the_wrong_size(make_mvtec):
    root = make_mvtec()
    write_mask(root / "bottle" / "ground_truth" / "crack" / "000_mask.png", size=(FAKE_SIZE[0], FAKE_SIZE[1] + 2))
    samples = read_category("mvtec", root, "bottle")
    index = next(i for i, s in enumerate(samples.test) if s.image_path.endswith("crack/000.png"))
    with pytest.raises(ValueError, match="mask .*000_mask.png' is 50x40 .* image .*crack/000.png' is 48x40"):
        load(samples.test, "bottle")[index]


def test_corrupt_image_is_named(make_mvtec):
    root = make_mvtec()
    broken = root / "bottle" / "train" / "good" / "003.png"
    broken.write_bytes(b"not a png at all")
    samples = read_category("mvtec", root, "bottle")
    index = [s.image_path for s in samples.train].index(str(broken))
    with pytest.raises(ValueError, match="cannot read image .*train/good/003.png'"):
        load(samples.train, "bottle")[index]


def test_visa_rows_are_checked(tmp_path):
    root = tmp_path / "visa"
    write_image(root / "candle" / "a.JPG", 1)
    write_mask(root / "candle" / "a_mask.png")
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True)

    def write(*rows):
        with csv_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["object", "split", "label", "image", "mask"])
            writer.writerows(rows)

    write(["candle", "train", "normal", "candle/a.JPG", ""], ["candle", "test", "anomaly", "candle/gone.JPG", ""])
    with pytest.raises(FileNotFoundError, match="line 3: image .*candle/gone.JPG' does not exist"):
        read_category("visa", root, "candle")
    write(["candle", "train", "normal", "candle/a.JPG", ""], ["candle", "test", "anomaly", "candle/a.JPG", ""])
    with pytest.raises(ValueError, match="line 3: anomalous image .* has no mask"):
        read_category("visa", root, "candle")
    write(["candle", "train", "normal", "candle/a.JPG", ""])
    with pytest.raises(ValueError, match="empty test split: .*1cls.csv' lists no test images of 'candle'"):
        read_category("visa", root, "candle")


def test_grayscale_files_become_three_channels(make_mvtec):
    root = make_mvtec(categories=("gray",))
    path = root / "gray" / "train" / "good" / "000.png"
    cv2.imwrite(str(path), np.full(FAKE_SIZE, 77, np.uint8))
    item = load(read_category("folder", root, "gray").train, "gray")[0]
    assert item["image"].shape[0] == 3 and torch.allclose(item["image"], torch.tensor(77 / 255), atol=1e-6)


def _defect_item(root, mask: np.ndarray):
    """Writes ``mask`` as the mask of bottle/crack/000.png and loads that test item at the file's size."""
    path = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    assert cv2.imwrite(str(path), mask)
    samples = read_category("mvtec", root, "bottle")
    index = next(i for i, s in enumerate(samples.test) if s.image_path.endswith("crack/000.png"))
    return load(samples.test, "bottle")[index]


def _rectangles(dtype, value, boxes) -> np.ndarray:
    mask = np.zeros(FAKE_SIZE, dtype)
    for rows, cols in boxes:
        mask[rows, cols] = value
    return mask


BOXES = [(slice(10, 20), slice(12, 30)), (slice(30, 35), slice(2, 10))]


@pytest.mark.parametrize(("dtype", "value"), [(np.uint16, 1), (np.uint16, 65535), (np.uint8, 1)],
                         ids=["16bit-0-1", "16bit-0-65535", "8bit-0-1"])
def test_masks_keep_their_defect_pixels_in_any_bit_depth(make_mvtec, dtype, value):
    root = make_mvtec()
    expected = _defect_item(root, _rectangles(np.uint8, 255, BOXES))["mask"]  # the plain 8-bit 0/255 mask
    assert expected.sum() > 0
    torch.testing.assert_close(_defect_item(root, _rectangles(dtype, value, BOXES))["mask"], expected)


def test_colour_mask_is_a_defect_wherever_a_colour_channel_is_set(make_mvtec):
    root = make_mvtec()
    expected = _defect_item(root, _rectangles(np.uint8, 255, BOXES))["mask"]
    bgra = np.zeros((*FAKE_SIZE, 4), np.uint8)
    bgra[..., 3] = 255  # an opaque alpha everywhere must not become a defect
    bgra[..., 2] = _rectangles(np.uint8, 200, BOXES[:1])  # one region red
    bgra[..., 1] = _rectangles(np.uint8, 1, BOXES[1:])  # the other a faint green
    torch.testing.assert_close(_defect_item(root, bgra)["mask"], expected)
    torch.testing.assert_close(_defect_item(root, bgra[..., :3])["mask"], expected)  # RGB without alpha


def test_empty_mask_of_a_defect_image_warns_once_naming_the_file(make_mvtec):
    root = make_mvtec()
    with pytest.warns(UserWarning, match=r"mask .*crack/000_mask.png' of defect image .*crack/000.png' has no pixel"):
        item = _defect_item(root, np.zeros(FAKE_SIZE, np.uint8))
    assert item["label"] == 1 and item["mask"].sum() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second read of the same file is silent
        _defect_item(root, np.zeros(FAKE_SIZE, np.uint8))
