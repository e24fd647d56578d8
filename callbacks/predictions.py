"""Writes what ``predict`` decided: ``predictions.csv`` and one overlay PNG per image, in the run folder.

- ``predictions.csv``: one row per scored image, sorted by path: the file, its size, the raw and normalised
  score, the decision, the thresholds and where they were calibrated (``calibrated_on``: source, target or
  manual) and how (``calibration_method``), and the overlay's file.
- ``overlays/<name>.png``: a header with the file, score and decision; the image with the predicted-mask
  contour; the normalised anomaly map over the image with the same contour; and the colour bar. The map
  colours are the calibrated normalisation (0 to 1, the pixel threshold at 0.5), one scale for every image
  of the run, and the bar prints the raw map value at each tick. A classifier (no map) gets the header and
  the image. ``<name>`` is the file's stem, or its path under ``predict_path`` where stems collide
  (``datamodules.predict.overlay_names``).

Under DDP every process appends its rows to ``predictions.rank<r>.csv``; at the end process 0 merges them
into ``predictions.csv`` and names any listed image that was not scored (unreadable).
"""

from __future__ import annotations

import csv
from functools import cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn  # noqa: E402
from matplotlib.colorbar import ColorbarBase  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

COLUMNS = ("path", "height", "width", "score", "normalised_score", "decision", "image_threshold",
           "pixel_threshold", "calibrated_on", "calibration_method", "overlay")
CONTOUR_COLOUR = (1.0, 1.0, 1.0)
HEADER_FONT_SIZE = 14


def _value(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


class PredictionWriter(Callback):
    """``predictions.csv`` and ``overlays/`` for ``predict`` (in the trainer defaults of ``cli.py``).

    A plain callback on ``on_predict_batch_end`` rather than Lightning's ``BasePredictionWriter``, which wants
    batch indices from a sampler that the predict images (an iterable dataset) do not have.

    Args:
        overlays: write the overlay PNGs (the CSV is always written).
        colormap: matplotlib colormap of the anomaly maps.
        overlay_size: smallest side of an overlay panel in pixels (smaller images are enlarged, for legibility).
        alpha: weight of the heatmap over the image.
    """

    def __init__(self, overlays: bool = True, colormap: str = "jet", overlay_size: int = 256,
                 alpha: float = 0.45) -> None:
        super().__init__()
        if colormap not in matplotlib.colormaps:
            raise ValueError(f"PredictionWriter colormap {colormap!r} is not a matplotlib colormap")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"PredictionWriter alpha must be in [0, 1], got {alpha}")
        self.overlays = overlays
        self.colormap = matplotlib.colormaps[colormap]
        self.overlay_size = overlay_size
        self.alpha = alpha
        self._legends: dict[tuple, np.ndarray] = {}

    # ------------------------------------------------------------------------------------------ hooks

    def _run_dir(self, trainer: Trainer) -> Path:
        return Path(trainer.default_root_dir)

    def _part(self, trainer: Trainer) -> Path:
        return self._run_dir(trainer) / f"predictions.rank{trainer.global_rank}.csv"

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        listing = getattr(trainer.datamodule, "predict_files", None)
        if listing is None:
            raise ValueError(f"{type(self).__name__} needs a ShiftAD DataModule with data.init_args.predict_path "
                             f"(it names the overlays after that listing); got {type(trainer.datamodule).__name__}")
        self.names = listing.names
        self.display_names = {path: _relative(path, listing.root) for path in listing.images}
        # The rows and overlays are the results: holding every batch's images for trainer.predict's return
        # value would grow with the folder.
        trainer.predict_loop.return_predictions = False
        run_dir = self._run_dir(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.overlays:
            (run_dir / "overlays").mkdir(exist_ok=True)
        with self._part(trainer).open("w", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writeheader()

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: dict, batch: dict,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        calibration = prediction["calibration"]
        rows = []
        for index, path in enumerate(prediction["path"]):
            name = self.names[path]
            overlay = f"overlays/{name}.png" if self.overlays else ""
            height, width = (int(v) for v in batch["original_size"][index])
            rows.append({
                "path": path, "height": height, "width": width,
                "score": _value(float(prediction["score"][index])),
                "normalised_score": _value(float(prediction["normalised_score"][index])),
                "decision": "anomalous" if bool(prediction["decision"][index]) else "normal",
                "image_threshold": _value(calibration["image_threshold"]),
                "pixel_threshold": _value(calibration["pixel_threshold"]),
                "calibrated_on": calibration["domain"], "calibration_method": calibration["method"],
                "overlay": overlay,
            })
            if self.overlays:
                picture = self.overlay(prediction, index, rows[-1], calibration)
                Image.fromarray(picture).save(self._run_dir(trainer) / overlay, compress_level=1)
        with self._part(trainer).open("a", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writerows(rows)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.barrier("predictions_written")
        if not trainer.is_global_zero:
            return
        run_dir = self._run_dir(trainer)
        parts = sorted(run_dir.glob("predictions.rank*.csv"))
        rows = []
        for part in parts:
            with part.open(newline="") as handle:
                rows += list(csv.DictReader(handle))
        rows.sort(key=lambda row: row["path"])
        target = run_dir / "predictions.csv"
        with target.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        for part in parts:
            part.unlink()
        scored = {row["path"] for row in rows}
        unreadable = [path for path in self.names if path not in scored]
        anomalous = sum(row["decision"] == "anomalous" for row in rows)
        rank_zero_info(f"predict: {len(rows)} image(s) scored, {anomalous} anomalous; wrote {target}"
                       + (f" and {run_dir / 'overlays'}" if self.overlays else ""))
        if unreadable:
            rank_zero_warn(f"predict: {len(unreadable)} image file(s) could not be read and have no row: "
                           + ", ".join(map(repr, unreadable)))
        if not rows:
            raise ValueError(f"predict: none of the {len(self.names)} image file(s) of data.init_args.predict_path "
                             f"could be read")

    # ------------------------------------------------------------------------------------------ drawing

    def overlay(self, prediction: dict, index: int, row: dict, calibration: dict) -> np.ndarray:
        """The overlay of one image: uint8 RGB ``[H, W, 3]``."""
        image = prediction["image"][index].float().clamp(0, 1)
        side = max(self.overlay_size, image.shape[-1])
        size = (round(side * image.shape[-2] / image.shape[-1]), side)
        image = _resized(image[None], size, "bilinear")[0].permute(1, 2, 0).numpy()
        panels = [image]
        maps = prediction["normalised_map"]
        raw_maps = prediction["anomaly_map"]
        if raw_maps is not None:
            if maps is not None:
                heat = _resized(maps[index][None, None].float(), size, "bilinear")[0, 0].numpy()
                mask = _resized(prediction["predicted_mask"][index][None, None].float(), size, "nearest")[0, 0]
                legend = self.legend(calibration, size[0])
                mask = mask.numpy().astype(bool)
            else:  # no pixel threshold: no mask, and the map on its own range, said on the bar
                raw = raw_maps[index].float()
                low, high = float(raw.min()), float(raw.max())
                heat = _resized(((raw - low) / max(high - low, 1e-12))[None, None], size, "bilinear")[0, 0].numpy()
                mask = None
                legend = _colour_bar(self.colormap, low, None, high, size[0])  # per image: not cached
            colours = self.colormap(heat, bytes=True)[..., :3].astype(np.float32) / 255  # clips to [0, 1]
            blended = (1 - self.alpha) * image + self.alpha * colours
            panels = [image, blended]
            if mask is not None:
                contour = find_boundaries(mask, mode="thick")
                for panel in panels:
                    panel[contour] = CONTOUR_COLOUR
            panels.append(legend)
        body = np.concatenate([(p * 255 + 0.5).astype(np.uint8) if p.dtype != np.uint8 else p for p in panels],
                              axis=1)
        return _with_header(body, _header(self.display_names[row['path']], row, calibration))

    def legend(self, calibration: dict, height: int) -> np.ndarray:
        """The colour bar of the normalised map with the raw value at each tick (cached per calibration)."""
        low, threshold, high = (calibration.get(f"pixel_{k}") for k in ("low", "threshold", "high"))
        key = (low, threshold, high, height)
        if key not in self._legends:
            self._legends[key] = _colour_bar(self.colormap, low, threshold, high, height)
        return self._legends[key]


@cache
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=HEADER_FONT_SIZE)


def _relative(path: str, root: Path) -> str:
    return Path(path).relative_to(root).as_posix() if Path(path).is_relative_to(root) else path


def _resized(tensor: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor, size=size, mode=mode, **({"align_corners": False} if mode == "bilinear" else {}))


def _colour_bar(colormap, low: float | None, threshold: float | None, high: float | None, height: int) -> np.ndarray:
    """uint8 RGB ``[height, w, 3]``: a vertical bar over 0..1 labelled with raw values. With a threshold the
    scale is the calibration's two ramps (raw low..threshold -> 0..0.5, threshold..high -> 0.5..1); without
    one, a plain min..max of the image."""
    dpi = 100
    figure = plt.figure(figsize=(1.45, height / dpi), dpi=dpi)
    axes = figure.add_axes((0.08, 0.04, 0.16, 0.92))
    bar = ColorbarBase(axes, cmap=colormap, norm=Normalize(0, 1))
    if threshold is not None:
        ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
        raw = [low, (low + threshold) / 2, threshold, (threshold + high) / 2, high]
        labels = [f"{value:.3g}" for value in raw]
        labels[2] = f"{raw[2]:.3g} thr."
        axes.axhline(0.5, color="white", linewidth=1.5)
    else:
        ticks = [0.0, 0.5, 1.0]
        labels = [f"{low + t * (high - low):.3g}" for t in ticks]
    bar.set_ticks(ticks)
    bar.set_ticklabels(labels, fontsize=7)
    bar.set_label("anomaly map (raw)" if threshold is not None else "anomaly map (raw), this image's range:\n"
                  "no pixel threshold", fontsize=7)
    figure.canvas.draw()
    picture = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3])
    plt.close(figure)
    if picture.height != height:  # the figure's pixel size is rounded
        picture = picture.resize((picture.width, height))
    return np.asarray(picture)


def _header(name: str, row: dict, calibration: dict) -> list[str]:
    lines = [
        f"{name}  ({row['width']}x{row['height']})",
        f"{row['decision'].upper()}  score {row['score']}  normalised {float(row['normalised_score']):.3f}",
        f"image threshold {row['image_threshold']} ({calibration['method']}, on {calibration['domain']})",
    ]
    if row["pixel_threshold"]:
        lines.append(f"pixel threshold {row['pixel_threshold']}")
    return lines


def _with_header(body: np.ndarray, lines: list[str]) -> np.ndarray:
    """``body`` under its text lines, widened with white where a line is longer than the body."""
    font = _font()
    line_height = HEADER_FONT_SIZE + 4
    width = max(body.shape[1], *(int(font.getlength(line)) + 8 for line in lines))
    canvas = Image.new("RGB", (width, line_height * len(lines) + 6 + body.shape[0]), "white")
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        draw.text((4, 3 + number * line_height), line, fill="black", font=font)
    canvas.paste(Image.fromarray(body), (0, line_height * len(lines) + 6))
    return np.asarray(canvas)
