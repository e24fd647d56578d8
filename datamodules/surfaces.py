"""The embedded "surfaces" datasets: textured surfaces with pixel-annotated defects, built on first use.

Categories: crops of real texture photographs shipped with scikit-image (``brick``, ``grass``,
``gravel``), each coloured with its own palette so that colour shifts matter, plus procedural textures
(``woven`` fabric, ``wood`` grain, ``terrazzo`` stone chips). Defect kinds, each with a pixel mask:
``scratch``, ``hole`` (dent), ``stain`` (discolouration), ``crack`` and ``wear`` (a smoothed patch
that changes texture, not colour); areas about 0.5-10 % of the image, contrasts down to subtle.

Two production lines of the same materials and defect kinds, each its own dataset and root (a real
two-folder domain pair):

- ``surfaces`` (line ``a``): the images above, with a mild exposure and noise variation.
- ``surfaces_line_b`` (line ``b``): other images of the same materials (other seeds, hence other crops of
  the photographs and other generator draws) seen by another camera that sees more of the surface
  (``LINE_B_FIELD_OF_VIEW``: finer weave, grain, chips and photo texture) under another light: a warmer
  white balance, a side-light gradient and an off-centre lamp spot, another tone curve, optical blur and
  signal-dependent sensor noise.
  The defects are painted on the surface before the camera sees them. No line-B image is a function of a
  line-A image.

The build is a pure function of ``SurfacesSpec`` (seeded per line, category, split and image) and writes the
MVTec AD layout: ``<category>/train/good``, ``test/<good|defect>``, ``ground_truth/<defect>/<stem>_mask.png``.
It goes to a temporary folder first; ``MARKER`` is written last and the folder is renamed into place,
so a half-built dataset is never used. The default location is
``$SHIFTAD_CACHE/<dataset>/<spec digest>`` (``SHIFTAD_CACHE`` defaults to ``~/.cache/shiftad``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import skimage.data

SURFACES_CATEGORIES = ("brick", "grass", "gravel", "woven", "wood", "terrazzo")
# The embedded datasets and the production line each one is.
EMBEDDED_DATASETS = ("surfaces", "surfaces_line_b")
LINES = {"surfaces": "a", "surfaces_line_b": "b"}
DEFECT_TYPES = ("scratch", "hole", "stain", "crack", "wear")
MARKER = "SURFACES_COMPLETE.json"
# Bump when the generator's output changes, so older caches are not reused.
GENERATOR_VERSION = 3

# Dark and light colour (RGB in [0, 1]) that the grayscale photographs are mapped between.
PHOTO_PALETTES = {
    "brick": ((0.30, 0.08, 0.04), (0.92, 0.55, 0.38)),
    "grass": ((0.05, 0.20, 0.04), (0.62, 0.88, 0.30)),
    "gravel": ((0.14, 0.16, 0.26), (0.86, 0.82, 0.70)),
}
# Line b: the camera sees 1.3 times more of the surface (side); a warmer light (RGB gains) from the upper
# left (radians from +x, image y down) rising by LINE_B_LIGHT_GRADIENT per image side, a lamp whose bright
# spot falls on the part off-centre by up to LINE_B_SPOT_OFFSET of the side (parts are not centred) and
# darkens by LINE_B_SPOT_FALLOFF at half a side from it; the camera's tone curve (gamma), optical blur
# (Gaussian sigma in pixels at 256 px) and sensor noise of std sqrt(read^2 + shot^2 * intensity).
# LINE_B_VERSION is in line b's digest: bump it when line b's output changes (line a's digest stays).
LINE_B_VERSION = 2
LINE_B_SEED_ENTRY = 11
LINE_B_FIELD_OF_VIEW = 1.3
LINE_B_WHITE_BALANCE = (1.12, 1.0, 0.80)
LINE_B_LIGHT_ANGLE = -2.4
LINE_B_LIGHT_GRADIENT = 0.3
LINE_B_SPOT_OFFSET = 0.3
LINE_B_SPOT_FALLOFF = 0.35
LINE_B_GAMMA = 0.8
LINE_B_BLUR = 1.2
LINE_B_READ_NOISE = 0.01
LINE_B_SHOT_NOISE = 0.03
TERRAZZO_CHIP_COLOURS = ((0.62, 0.22, 0.12), (0.20, 0.25, 0.36), (0.93, 0.88, 0.74), (0.10, 0.10, 0.10),
                         (0.35, 0.50, 0.35))
# scikit-image photographs of objects and scenes that no category is cut from (the photo categories use
# brick, grass and gravel): the pools of pasted negatives and of GMM pre-training, disjoint from every
# surfaces image.
PHOTOS_OUTSIDE_SURFACES = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "immunohistochemistry",
                           "hubble_deep_field", "retina", "camera", "coins", "clock", "moon", "page")


@dataclass(frozen=True)
class SurfacesSpec:
    """Everything the generated dataset depends on.

    Args:
        image_size: side of the square images in pixels.
        train_good: normal training images per category.
        test_good: normal test images per category.
        test_defects: defective test images per category, spread evenly over ``DEFECT_TYPES``.
        categories: which categories to build.
        seed: generator seed.
        line: production line: ``"a"`` is ``surfaces``, ``"b"`` is ``surfaces_line_b``.
    """

    image_size: int = 256
    train_good: int = 100
    test_good: int = 40
    test_defects: int = 60
    categories: tuple[str, ...] = SURFACES_CATEGORIES
    seed: int = 0
    line: str = "a"

    def __post_init__(self) -> None:
        if self.line not in LINES.values():
            raise ValueError(f"unknown surfaces line {self.line!r}; valid lines: "
                             + ", ".join(f"{line!r} ({name})" for name, line in LINES.items()))
        unknown = [c for c in self.categories if c not in SURFACES_CATEGORIES]
        if unknown:
            raise ValueError(f"unknown surfaces categories {unknown}; valid: {', '.join(SURFACES_CATEGORIES)}")
        if self.image_size < 32 or min(self.train_good, self.test_good, self.test_defects) < 1:
            raise ValueError(f"surfaces spec needs image_size >= 32 and at least one image per split: {self}")

    @property
    def dataset(self) -> str:
        return next(name for name, line in LINES.items() if line == self.line)

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        if self.line == "a":
            del fields["line"]  # line a's digest predates the field: its caches and results stay valid
        else:
            fields["line_b_version"] = LINE_B_VERSION
        payload = json.dumps({"version": GENERATOR_VERSION, **fields}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


def embedded_spec(dataset: str) -> SurfacesSpec:
    """The default spec of an embedded dataset."""
    if dataset not in LINES:
        raise ValueError(f"{dataset!r} is not an embedded dataset; embedded: {', '.join(EMBEDDED_DATASETS)}")
    return SurfacesSpec(line=LINES[dataset])


def cache_dir() -> Path:
    return Path(os.environ.get("SHIFTAD_CACHE") or "~/.cache/shiftad").expanduser()


def default_surfaces_root(spec: SurfacesSpec = SurfacesSpec()) -> Path:
    return cache_dir() / spec.dataset / spec.digest()


def default_embedded_root(dataset: str) -> Path:
    """The cache folder of an embedded dataset's default build."""
    return default_surfaces_root(embedded_spec(dataset))


def is_built(root: Path) -> bool:
    return (root / MARKER).is_file()


def ensure_embedded(dataset: str, root: Path) -> None:
    """Build the default spec of ``dataset`` into ``root`` unless a build is there; a build of another line
    there is an error (it would silently be the other dataset)."""
    spec = embedded_spec(dataset)
    if is_built(root):
        built_line = json.loads((root / MARKER).read_text())["spec"].get("line", "a")
        if built_line != spec.line:
            raise ValueError(f"dataset={dataset!r} expects a build of surfaces line {spec.line!r} but "
                             f"{str(root)!r} holds line {built_line!r}; give that dataset's root or none")
        return
    ensure_surfaces(root, spec)


def ensure_surfaces(root: Path, spec: SurfacesSpec = SurfacesSpec()) -> Path:
    """Build the dataset at ``root`` unless a complete build is already there; returns ``root``."""
    if is_built(root):
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{str(root)!r} is not empty but holds no complete surfaces build ({MARKER} "
                              "missing); delete it or choose another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    building = root.parent / f".{root.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    start = time.perf_counter()
    for category in spec.categories:
        _build_category(building / category, category, spec)
    info = {"spec": dataclasses.asdict(spec), "version": GENERATOR_VERSION,
            "build_seconds": round(time.perf_counter() - start, 2)}
    (building / MARKER).write_text(json.dumps(info, indent=2))
    try:
        if root.exists():
            root.rmdir()  # empty, checked above, unless another process has just finished its build
        building.rename(root)
    except OSError:
        # Another process finished the same build first: use theirs.
        shutil.rmtree(building, ignore_errors=True)
        if not is_built(root):
            raise
    return root


def _build_category(folder: Path, category: str, spec: SurfacesSpec) -> None:
    category_seed = SURFACES_CATEGORIES.index(category)
    size = spec.image_size
    # Line a's seeds predate the lines; line b appends its own entry, so no image of it shares a stream.
    line_entry = [] if spec.line == "a" else [LINE_B_SEED_ENTRY]
    render = render_texture if spec.line == "a" else render_line_b
    for split, count in (("train", spec.train_good), ("test", spec.test_good)):
        out = folder / split / "good"
        out.mkdir(parents=True)
        for i in range(count):
            rng = np.random.default_rng([spec.seed, category_seed, 0 if split == "train" else 1, i, *line_entry])
            _write_image(out / f"{i:03d}.png", render(category, rng, size)[0])
    for i in range(spec.test_defects):
        kind = DEFECT_TYPES[i % len(DEFECT_TYPES)]
        rng = np.random.default_rng([spec.seed, category_seed, 2, i, *line_entry])
        image, mask = render(category, rng, size, kind)
        (folder / "test" / kind).mkdir(parents=True, exist_ok=True)
        (folder / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        stem = f"{i // len(DEFECT_TYPES):03d}"
        _write_image(folder / "test" / kind / f"{stem}.png", image)
        cv2.imwrite(str(folder / "ground_truth" / kind / f"{stem}_mask.png"), mask.astype(np.uint8) * 255)


def _write_image(path: Path, image: np.ndarray) -> None:
    rgb = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


# ---------------------------------------------------------------------------------------------- textures


def render_texture(category: str, rng: np.random.Generator, size: int,
                   defect: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A line-a RGB float32 image ``[size, size, 3]`` in [0, 1] of the category, with one defect of kind
    ``defect`` painted in when given; returns (image, boolean defect mask or None)."""
    image = _surface(category, rng, size, field_of_view=1.0)
    # Mild acquisition variation: exposure and sensor noise.
    image = image * rng.uniform(0.95, 1.05) + rng.normal(0.0, 0.01, image.shape)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return add_defect(image, defect, rng) if defect else (image, None)


def render_line_b(category: str, rng: np.random.Generator, size: int,
                  defect: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A line-b image (see the module docstring): the surface, its defect, then line b's camera."""
    image = np.clip(_surface(category, rng, size, LINE_B_FIELD_OF_VIEW), 0.0, 1.0).astype(np.float32)
    mask = None
    if defect:
        image, mask = add_defect(image, defect, rng)
    return _line_b_camera(image, rng), mask


def _surface(category: str, rng: np.random.Generator, size: int, field_of_view: float) -> np.ndarray:
    """The bare surface; ``field_of_view`` is how much of it the image covers, relative to line a."""
    if category in PHOTO_PALETTES:
        return _photo_texture(category, rng, size, field_of_view)
    return {"woven": _woven, "wood": _wood, "terrazzo": _terrazzo}[category](rng, size, field_of_view)


def _line_b_camera(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Line b's light and camera: white balance and exposure, a side light and an off-centre lamp spot, the
    tone curve, optical blur, then signal-dependent sensor noise."""
    size = image.shape[0]
    gains = np.array(LINE_B_WHITE_BALANCE, np.float32) * rng.uniform(0.92, 1.08)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
    angle = LINE_B_LIGHT_ANGLE + rng.normal(0.0, 0.2)
    ramp = xx * np.cos(angle) + yy * np.sin(angle)  # -0.71 .. 0.71 across the image
    spot_x, spot_y = rng.uniform(-LINE_B_SPOT_OFFSET, LINE_B_SPOT_OFFSET, 2)
    spot = 1 - LINE_B_SPOT_FALLOFF * 4 * ((xx - spot_x) ** 2 + (yy - spot_y) ** 2)
    light = (1 + LINE_B_LIGHT_GRADIENT * ramp) * np.clip(spot, 0.2, None)
    image = np.clip(image * gains * light[..., None], 0.0, 1.0) ** LINE_B_GAMMA
    image = cv2.GaussianBlur(image, (0, 0), LINE_B_BLUR * size / 256)
    noise_std = np.sqrt(LINE_B_READ_NOISE ** 2 + LINE_B_SHOT_NOISE ** 2 * image)
    image = image + noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def skimage_photo(name: str) -> np.ndarray:
    """A scikit-image photograph as RGB uint8 [H, W, 3]."""
    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image  # stereo pairs: the left view
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


@cache
def _photo(name: str) -> np.ndarray:
    gray = getattr(skimage.data, name)().astype(np.float32)
    lo, hi = np.percentile(gray, [1, 99])
    return np.clip((gray - lo) / (hi - lo), 0.0, 1.0)


def _photo_texture(category: str, rng: np.random.Generator, size: int, field_of_view: float) -> np.ndarray:
    photo = _photo(category)
    # Line a: about half the photograph, scale jitter +-8 %.
    side = int(photo.shape[0] * rng.uniform(0.46, 0.54) * field_of_view)
    y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
    crop = photo[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gray = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA)
    dark, light = (np.array(c, np.float32) for c in PHOTO_PALETTES[category])
    image = dark + gray[..., None] * (light - dark)
    # Slow colour drift over the surface, so colour carries spatial information too.
    drift = _smooth_noise(rng, size, 3)[..., None] * np.array([0.02, -0.01, 0.015], np.float32)
    return image + drift


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, aspect: float = 1.0) -> np.ndarray:
    """Zero-mean, unit-std noise that varies over about ``cells`` blobs per side (``aspect`` stretches x)."""
    grid = rng.standard_normal((cells + 2, max(2, round((cells + 2) / aspect)))).astype(np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _woven(rng: np.random.Generator, size: int, field_of_view: float) -> np.ndarray:
    period = size / (rng.uniform(11.0, 13.0) * field_of_view)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u = xx + rng.uniform(0, period) + 0.006 * size * _smooth_noise(rng, size, 4)
    v = yy + rng.uniform(0, period) + 0.006 * size * _smooth_noise(rng, size, 4)
    fu, fv = (u / period) % 1.0, (v / period) % 1.0
    warp_on_top = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    # Round thread cross-sections, darker where a thread dives under its neighbour, with fibre streaks
    # running along each thread.
    warp = np.sin(np.pi * fu) ** 0.6 * (0.75 + 0.25 * np.sin(np.pi * fv))
    weft = np.sin(np.pi * fv) ** 0.6 * (0.75 + 0.25 * np.sin(np.pi * fu))
    warp += 0.08 * _smooth_noise(rng, size, size // 16, 1 / 8)
    weft += 0.08 * _smooth_noise(rng, size, size // 16, 8.0)
    warp_colour = np.array((0.12, 0.20, 0.48), np.float32)
    weft_colour = np.array((0.55, 0.62, 0.80), np.float32)
    top = np.where(warp_on_top, warp, weft)[..., None]
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour)
    return 0.05 + top * colour


def _wood(rng: np.random.Generator, size: int, field_of_view: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rings = rng.uniform(7.0, 10.0) * field_of_view
    phase = rng.uniform(0, 1) + 0.35 * _smooth_noise(rng, size, 3) + 0.08 * _smooth_noise(rng, size, 8, 4.0)
    wobble = 0.15 * np.sin(2.5 * field_of_view * xx + rng.uniform(0, 6))
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (rings * (yy + wobble) + phase))
    grain = grain ** 2.5 + 0.12 * _smooth_noise(rng, size, size // 3, 8.0)  # sharp late-wood + fibre streaks
    light = np.array((0.86, 0.62, 0.36), np.float32)
    dark = np.array((0.42, 0.22, 0.09), np.float32)
    return light + np.clip(grain, 0, 1.2)[..., None] * (dark - light)


def _terrazzo(rng: np.random.Generator, size: int, field_of_view: float) -> np.ndarray:
    image = np.empty((size, size, 3), np.float32)
    image[:] = np.array((0.78, 0.77, 0.74), np.float32) + 0.03 * _smooth_noise(rng, size, 6)[..., None]
    chips = int(size * size * field_of_view ** 2 / 130)
    for _ in range(chips):
        colour = np.array(TERRAZZO_CHIP_COLOURS[rng.integers(len(TERRAZZO_CHIP_COLOURS))], np.float32)
        colour = np.clip(colour + rng.normal(0, 0.04, 3), 0, 1)
        centre = rng.uniform(0, size, 2)
        radius = size / field_of_view * rng.uniform(0.008, 0.03)
        corners = rng.integers(4, 7)
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = radius * rng.uniform(0.6, 1.3, corners)
        polygon = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
        cv2.fillPoly(image, [np.rint(polygon).astype(np.int32)], colour.tolist(), lineType=cv2.LINE_AA)
    return image


# ---------------------------------------------------------------------------------------------- defects


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of ``kind`` into ``image``; returns (image, boolean mask)."""
    size = image.shape[0]
    painter = {"scratch": _scratch, "hole": _hole, "stain": _stain, "crack": _crack, "wear": _wear}[kind]
    image, mask = painter(image.copy(), rng, size)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask


def _line_alpha(points: np.ndarray, size: int, thickness: int) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [np.rint(points * 16).astype(np.int32)], False, 255, thickness, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def _inside_point(rng: np.random.Generator, size: int, margin: float) -> np.ndarray:
    return rng.uniform(margin * size, (1 - margin) * size, 2)


def _scratch(image: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    length = size * rng.uniform(0.25, 0.5)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    start = _inside_point(rng, size, 0.1)
    end = np.clip(start + length * direction, 0.05 * size, 0.95 * size)
    bend = (start + end) / 2 + np.array([-direction[1], direction[0]]) * length * rng.uniform(-0.15, 0.15)
    t = np.linspace(0, 1, 40)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end
    alpha = _line_alpha(curve, size, max(1, round(size * rng.uniform(0.008, 0.016))))
    delta = rng.uniform(0.12, 0.4) * (1 if rng.random() < 0.7 else -1)
    return image + delta * alpha[..., None], alpha > 0.3


def _hole(image: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    radius = size * rng.uniform(0.045, 0.09)
    ratio = rng.uniform(0.7, 1.0)
    centre = _inside_point(rng, size, 0.12)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = (xx - centre[0]) / radius, (yy - centre[1]) / (radius * ratio)
    dist = np.sqrt(dx ** 2 + dy ** 2)
    depth = rng.uniform(0.3, 0.8)
    bowl = np.clip(1 - dist ** 2, 0, 1)
    # Light from the top left: the far inner wall of the dent catches it, the near one is shadowed.
    wall = np.clip(0.5 * (dx + dy), -1, 1) * (dist < 1) * bowl ** 0.5
    rim = np.exp(-(((dist - 1) / 0.12) ** 2))  # the dent's edge casts a thin dark ring
    shading = (1 - depth * bowl + 0.5 * depth * wall) * (1 - 0.3 * depth * rim)
    return image * shading[..., None], dist < 1.0


def _soft_blob(rng: np.random.Generator, size: int, radius: float) -> np.ndarray:
    centre = _inside_point(rng, size, 0.15)
    angle = rng.uniform(0, np.pi)
    ratio = rng.uniform(0.6, 1.0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    px, py = xx - centre[0], yy - centre[1]
    along = (px * np.cos(angle) + py * np.sin(angle)) / radius
    across = (-px * np.sin(angle) + py * np.cos(angle)) / (radius * ratio)
    dist = np.sqrt(along ** 2 + across ** 2) + 0.3 * _smooth_noise(rng, size, 5)
    blob = (dist < 1).astype(np.float32)
    return cv2.GaussianBlur(blob, (0, 0), max(0.6, size / 200))


def _stain(image: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    soft = _soft_blob(rng, size, size * rng.uniform(0.06, 0.15))
    colour = np.array(rng.uniform(0.05, 0.95, 3), np.float32)
    opacity = rng.uniform(0.15, 0.5)
    # The stain tints the surface but keeps its texture (multiplied by local brightness).
    luminance = image.mean(axis=2, keepdims=True)
    tinted = colour * (0.4 + 0.6 * luminance / max(float(luminance.mean()), 1e-3))
    weight = opacity * soft[..., None]
    return image * (1 - weight) + tinted * weight, soft > 0.5


def _crack(image: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    thickness = max(1, round(size * rng.uniform(0.006, 0.011)))
    steps = int(rng.uniform(0.2, 0.45) * 40)
    heading = rng.uniform(0, 2 * np.pi)
    point = _inside_point(rng, size, 0.25)
    points = [point]
    for _ in range(steps):
        heading += rng.normal(0, 0.45)
        point = np.clip(point + size / 40 * np.array([np.cos(heading), np.sin(heading)]), 0, size - 1)
        points.append(point)
    alpha = _line_alpha(np.array(points), size, thickness)
    if rng.random() < 0.5:  # a side branch
        branch = [points[len(points) // 2]]
        heading += rng.choice([-1.0, 1.0]) * 0.9
        for _ in range(steps // 3):
            heading += rng.normal(0, 0.45)
            branch.append(np.clip(branch[-1] + size / 40 * np.array([np.cos(heading), np.sin(heading)]), 0, size - 1))
        alpha = np.maximum(alpha, _line_alpha(np.array(branch), size, max(1, thickness - 1)))
    darkness = rng.uniform(0.4, 0.85)
    return image * (1 - darkness * alpha[..., None]), alpha > 0.3


def _wear(image: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    soft = _soft_blob(rng, size, size * rng.uniform(0.07, 0.15))
    smoothed = cv2.GaussianBlur(image, (0, 0), size * rng.uniform(0.005, 0.012)) * rng.uniform(0.97, 1.1)
    weight = soft[..., None]
    return image * (1 - weight) + smoothed * weight, soft > 0.5
