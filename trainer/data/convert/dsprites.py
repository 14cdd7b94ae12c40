"""Procedural dSprites: render the official 737,280-image grid straight into shards.

The official npz cannot be downloaded here, so this module draws the same images from the
recipe in docs/data-formats.md: binary 64x64, a pixel is on when its centre lies inside the shape,
sprite centre at 16 + 32·pos px (x from the left, y from the top), rotation about the centre,
counter-clockwise as displayed. ``compare_to_official_frames`` measures the renderer against
the frames of the official animation (tests/test_dsprites.py keeps it honest).

Grid (row-major, posY fastest): color [1], shape [1, 2, 3] = square, ellipse, heart,
scale linspace(0.5, 1, 6), orientation linspace(0, 2π, 40), posX, posY linspace(0, 1, 32).
"""

from __future__ import annotations

import functools
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.data.convert.shards import build_shards, encode_npy, split_indices, write_manifest
from trainer.data.shards import Manifest, make_factor

IMAGE_SIZE = 64
FACTOR_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
SHAPE_NAMES = ("square", "ellipse", "heart")
GRID_SIZES = (1, 3, 6, 40, 32, 32)
GRID_VALUES: tuple[np.ndarray, ...] = (
    np.array([1.0]),
    np.array([1.0, 2.0, 3.0]),
    np.linspace(0.5, 1.0, 6),
    np.linspace(0.0, 2 * np.pi, 40),
    np.linspace(0.0, 1.0, 32),
    np.linspace(0.0, 1.0, 32),
)
FACTOR_KINDS = ("categorical", "categorical", "continuous", "periodic", "continuous", "continuous")
NUM_IMAGES = int(np.prod(GRID_SIZES))  # 737,280
# Row-major strides of the grid: index = sum(class_i * stride_i).
GRID_STRIDES = np.array([int(np.prod(GRID_SIZES[i + 1:])) for i in range(6)], dtype=np.int64)

# Shape geometry in px at scale 1 (measured from the official frames; see module docstring).
SQUARE_HALF_SIDE = 9.6
ELLIPSE_SEMI_AXES = (12.8, 7.2)  # horizontal, vertical at orientation 0
# Heart: two lobes (circles) joined by tangent lines to the tip; x within ±10, y in [-9, 8].
# Fitted to the official frames (every heart frame within 16 px, mean 8): slightly narrower and
# taller than the nominal ±10 x [-9, 8].
HEART_HALF_WIDTH, HEART_TOP, HEART_TIP = 9.75, 9.15, -8.9
HEART_LOBE_RADIUS = 5.0
# Pixel j covers [j, j+1); its centre is at j + PIXEL_CENTRE.
PIXEL_CENTRE = 0.5


# ---- geometry ----------------------------------------------------------------------------------
def _local_coords(scale, orientation, pos_x, pos_y) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in the sprite's frame (u right, w up), divided by the scale."""
    scale, orientation, pos_x, pos_y = (np.asarray(a, dtype=np.float64)[..., None, None]
                                        for a in (scale, orientation, pos_x, pos_y))
    grid = np.arange(IMAGE_SIZE, dtype=np.float64) + PIXEL_CENTRE
    dx = grid[None, :] - (16.0 + 32.0 * pos_x)        # columns: x to the right
    dy_up = (16.0 + 32.0 * pos_y) - grid[:, None]     # rows grow downward; flip to y up
    cos, sin = np.cos(orientation), np.sin(orientation)
    # Rotating the shape by +θ (counter-clockwise as displayed) = rotating the points by -θ.
    u = (dx * cos + dy_up * sin) / scale
    w = (-dx * sin + dy_up * cos) / scale
    return u, w


def _inside_square(u, w):
    return (np.abs(u) <= SQUARE_HALF_SIDE) & (np.abs(w) <= SQUARE_HALF_SIDE)


def _inside_ellipse(u, w):
    a, b = ELLIPSE_SEMI_AXES
    return (u / a) ** 2 + (w / b) ** 2 <= 1.0


@functools.lru_cache(maxsize=None)
def _heart_geometry(radius: float) -> tuple[float, float, float, float]:
    """Lobe centre (a, b), tangent-point height y_p and tan of the side lines' half-angle."""
    a, b = HEART_HALF_WIDTH - radius, HEART_TOP - radius
    dist = np.hypot(a, b - HEART_TIP)
    angle = np.arctan2(a, b - HEART_TIP) + np.arcsin(radius / dist)  # outer tangent from the tip
    y_p = HEART_TIP + np.sqrt(dist**2 - radius**2) * np.cos(angle)
    return a, b, y_p, np.tan(angle)


def _inside_heart(u, w):
    a, b, y_p, slope = _heart_geometry(HEART_LOBE_RADIUS)
    r2 = HEART_LOBE_RADIUS**2
    au = np.abs(u)  # the heart is symmetric about the vertical axis
    lobes = (au - a) ** 2 + (w - b) ** 2 <= r2
    cone = (w >= HEART_TIP) & (w <= y_p) & (au <= (w - HEART_TIP) * slope)
    middle = (w > y_p) & (w <= b) & (au <= a)
    return lobes | cone | middle


_INSIDE = (_inside_square, _inside_ellipse, _inside_heart)


def render(shape_idx, scale, orientation, pos_x, pos_y) -> np.ndarray:
    """Render dSprites images: uint8 in {0, 1}, shape broadcast(args) + (64, 64).

    ``shape_idx`` is 0, 1, 2 = square, ellipse, heart (the official latent minus one); the other
    arguments are factor values. Arrays broadcast, so one call renders a whole batch.
    """
    shape_idx = np.asarray(shape_idx)
    u, w = _local_coords(scale, orientation, pos_x, pos_y)
    full = np.broadcast_shapes(shape_idx.shape, u.shape[:-2]) + (IMAGE_SIZE, IMAGE_SIZE)
    u, w = np.broadcast_to(u, full), np.broadcast_to(w, full)
    shapes = np.broadcast_to(shape_idx[..., None, None], full)
    out = np.zeros(full, dtype=np.uint8)
    for k, inside in enumerate(_INSIDE):
        mask = shapes == k
        if mask.any():
            out[mask] = inside(u[mask], w[mask])
    return out


# ---- grid ----------------------------------------------------------------------------------------
def grid_classes(index) -> np.ndarray:
    """Grid index (or array of them) -> latent classes [..., 6]."""
    index = np.asarray(index, dtype=np.int64)
    return (index[..., None] // GRID_STRIDES) % np.array(GRID_SIZES)


def grid_values(index) -> np.ndarray:
    """Grid index -> factor values [..., 6] (float32), in the official latents_values order."""
    if np.ndim(index) == 0:  # one index: table look-ups, ~3 us instead of ~8
        return _factor_values(_classes_of(int(index)))
    classes = grid_classes(index)
    return np.stack([GRID_VALUES[i][classes[..., i]] for i in range(6)], axis=-1).astype(np.float32)


def render_index(index) -> np.ndarray:
    """Render grid indices: uint8 {0, 1} [..., 64, 64]."""
    if np.ndim(index) == 0:
        return _render_grid_image(*_classes_of(int(index))[1:])
    v = grid_values(index).astype(np.float64)
    return render(grid_classes(index)[..., 1], v[..., 2], v[..., 3], v[..., 4], v[..., 5])


# ---- the fast path for one grid image (shard writing) -----------------------------------------------
# render_index on one index spent ~66 us in numpy call overhead on 64x64 arrays (cProfile, 20k
# samples); this path takes 10-16 us. It computes exactly the same float64 operations as `render`,
# element for element, but (1) u and w are outer sums of per-column and per-row terms, cached per
# factor class, and (2) only the window around the sprite is evaluated: ~22 % of the pixels at
# scale 1. tests/test_dsprites.py checks it against the geometry evaluated directly.
def _sprite_reach() -> float:
    """Largest distance from the sprite centre of any inside point, in px at scale 1."""
    heart_box_corner = np.hypot(HEART_HALF_WIDTH, max(HEART_TOP, -HEART_TIP))  # the heart's bounding box
    return float(max(SQUARE_HALF_SIDE * np.sqrt(2), max(ELLIPSE_SEMI_AXES), heart_box_corner))


# One pixel of margin on top of the reach: pixels outside the window are farther than the reach
# from the centre (a rotation keeps distances), so every predicate is False there.
_WINDOW_MARGIN_PX = 1.0


_STRIDES_AND_SIZES = tuple(zip(GRID_STRIDES.tolist(), GRID_SIZES))  # Python ints: no numpy per call


def _classes_of(index: int) -> tuple[int, ...]:
    """Grid index -> its six classes, in Python ints (grid_classes without numpy per call)."""
    return tuple((index // stride) % size for stride, size in _STRIDES_AND_SIZES)


@functools.lru_cache(maxsize=None)
def _float32_values() -> tuple[np.ndarray, ...]:
    """GRID_VALUES as float32, the values render_index draws from (grid_values' precision)."""
    return tuple(v.astype(np.float32) for v in GRID_VALUES)


def _factor_values(classes: tuple[int, ...]) -> np.ndarray:
    """Six classes -> factor values [6] (float32), as grid_values gives them."""
    return np.array([values[c] for values, c in zip(_float32_values(), classes)], dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _pixel_offsets(pos_i: int) -> tuple[np.ndarray, float]:
    """Pixel centres minus the sprite centre at grid position pos_i -> ([64], centre px)."""
    centre = 16.0 + 32.0 * np.float64(_float32_values()[4][pos_i])
    return (np.arange(IMAGE_SIZE, dtype=np.float64) + PIXEL_CENTRE) - centre, float(centre)


@functools.lru_cache(maxsize=None)
def _rotation(orient_i: int) -> tuple[np.float64, np.float64]:
    """cos, sin of orientation class orient_i, computed on a [1, 1] array as _local_coords does
    (numpy's vectorised cos/sin may round differently from its scalar path)."""
    theta = np.full((1, 1), _float32_values()[3][orient_i], dtype=np.float64)
    return np.cos(theta)[0, 0], np.sin(theta)[0, 0]


@functools.lru_cache(maxsize=None)
def _window(pos_i: int, scale_i: int) -> slice:
    """The pixel rows (or columns) that can be inside a sprite at this position and scale."""
    _, centre = _pixel_offsets(pos_i)
    reach = _sprite_reach() * float(_float32_values()[2][scale_i]) + _WINDOW_MARGIN_PX
    return slice(max(0, int(np.floor(centre - reach))), min(IMAGE_SIZE, int(np.ceil(centre + reach)) + 1))


@functools.lru_cache(maxsize=None)
def _axis_terms(pos_x_i: int, pos_y_i: int, orient_i: int) -> tuple[np.ndarray, ...]:
    """The four products of _local_coords: dx*cos, dy_up*sin [64] and -dx*sin, dy_up*cos [64]."""
    cos, sin = _rotation(orient_i)
    dx = _pixel_offsets(pos_x_i)[0]
    dy_up = -_pixel_offsets(pos_y_i)[0]  # (16 + 32 pos) - grid: the same float as the negation
    return dx * cos, dy_up * sin, -dx * sin, dy_up * cos


def _render_grid_image(shape_i: int, scale_i: int, orient_i: int, pos_x_i: int, pos_y_i: int) -> np.ndarray:
    """One grid image, uint8 {0, 1} [64, 64], equal to render(...) of its factor values."""
    cols, rows = _window(pos_x_i, scale_i), _window(pos_y_i, scale_i)
    u_col, u_row, w_col, w_row = _axis_terms(pos_x_i, pos_y_i, orient_i)
    scale = np.float64(_float32_values()[2][scale_i])
    u = (u_col[None, cols] + u_row[rows, None]) / scale
    w = (w_col[None, cols] + w_row[rows, None]) / scale
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    out[rows, cols] = _INSIDE[shape_i](u, w)
    return out


def encode_binary_png(image: np.ndarray) -> bytes:
    """1-bit PNG of a {0,1} image [H, W] (decodes to 0/255 grayscale).

    Kept on Pillow (~27 us, now the largest cost per shard sample): a zlib path with Pillow's row
    filters and deflate settings (memLevel 9, Z_FILTERED) spends ~22 us in compressobj.copy()
    alone (deflate's buffers), before filtering: too little to gain for bytes that could drift.
    """
    buf = io.BytesIO()
    Image.fromarray(image.astype(bool)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def render_sample(index: int) -> dict:
    """The shard sample of grid index: png, factor values, cls = shape index 0..2."""
    return {"__key__": str(index), "png": encode_binary_png(render_index(index)),
            "factors.npy": grid_values(index), "cls": int(grid_classes(index)[1])}


@functools.lru_cache(maxsize=1)
def _factors_npy_header() -> bytes:
    """The .npy header of a float32 [6] array: encode_npy's bytes minus the 24 data bytes."""
    return encode_npy(np.zeros(6, dtype=np.float32))[:-6 * 4]


def _shard_sample(index: int) -> dict:
    """render_sample with its fields already as the bytes the shard writer stores (what
    generate_dsprites writes): the .npy from a cached header, ~1 us instead of ~10 for encode_npy."""
    classes = _classes_of(index)
    return {"__key__": str(index), "png": encode_binary_png(_render_grid_image(*classes[1:])),
            "factors.npy": _factors_npy_header() + _factor_values(classes).tobytes(), "cls": classes[1]}


def dsprites_factors() -> list:
    return [make_factor(n, k, v) for n, k, v in zip(FACTOR_NAMES, FACTOR_KINDS, GRID_VALUES)]


def generate_dsprites(out_dir: Path, *, seed: int = 0, samples_per_shard: int = 10000, processes: int = 2,
                      limit: int | None = None, progress: bool = True) -> Manifest:
    """Render the official grid into shards + manifest (80/10/10 split by sample, seeded).

    ``limit`` keeps a seeded random subset of that many grid indices (tests, CI).
    """
    out_dir = Path(out_dir)
    indices = np.arange(NUM_IMAGES)
    if limit is not None:
        indices = np.sort(np.random.default_rng(seed).choice(NUM_IMAGES, size=min(limit, NUM_IMAGES), replace=False))
    parts = split_indices(len(indices), seed)
    splits = {name: indices[pos] for name, pos in parts.items()}
    shards = build_shards(out_dir, splits, _shard_sample, samples_per_shard=samples_per_shard,
                          processes=processes, progress=progress)
    manifest = Manifest(dataset="dsprites", channels=1, image_size=IMAGE_SIZE, image_format="png",
                        factors=dsprites_factors(), default_factor="shape", num_samples=len(indices), seed=seed,
                        splits=Manifest.splits_from(shards), skipped=list(shards.skipped),
                        extra={"classes": list(SHAPE_NAMES), "source": "procedural", "limit": limit,
                               # a subset's keys are not 0..N-1: list them (instance labels need them)
                               **({"keys": indices.tolist()} if limit is not None else {})})
    write_manifest(out_dir, manifest)
    return manifest


# ---- validation against the official animation ----------------------------------------------------
def read_gif_frames(gif_path: Path) -> np.ndarray:
    """All frames of a GIF as bool [N, 64, 64] (on = bright)."""
    from PIL import ImageSequence

    with Image.open(gif_path) as gif:
        return np.stack([np.asarray(f.convert("L")) > 127 for f in ImageSequence.Iterator(gif)])


def _moments(images: np.ndarray) -> np.ndarray:
    """Area, centroid and second central moments of bool images [N, 64, 64] -> [N, 6]."""
    images = images.astype(np.float64)
    ys, xs = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE].astype(np.float64)
    area = images.sum((-2, -1))
    safe = np.maximum(area, 1)
    cx, cy = (images * xs).sum((-2, -1)) / safe, (images * ys).sum((-2, -1)) / safe
    dx, dy = xs - cx[..., None, None], ys - cy[..., None, None]
    mxx, myy, mxy = ((images * d).sum((-2, -1)) / safe for d in (dx * dx, dy * dy, dx * dy))
    return np.stack([area, cx, cy, mxx, myy, mxy], axis=-1)


@functools.lru_cache(maxsize=1)
def _template_moments() -> np.ndarray:
    """Moments of every (shape, scale, orientation) sprite at the grid centre -> [3, 6, 40, 6]."""
    shapes, scales, orients = np.meshgrid(np.arange(3), GRID_VALUES[2], GRID_VALUES[3], indexing="ij")
    centre = GRID_VALUES[4][16]
    return _moments(render(shapes, scales, orients, centre, centre).astype(bool))


def _implied_positions(m: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grid positions that put each template's centroid on the frame's centroid."""
    centre_px = 16 + 32 * GRID_VALUES[4][16]
    cx, cy = m[1] - (t[..., 1] - centre_px), m[2] - (t[..., 2] - centre_px)
    to_grid = lambda c: np.clip(np.rint((c - 16) / 32 * 31), 0, 31).astype(np.int64)  # noqa: E731
    return to_grid(cx), to_grid(cy)


def _mismatches(frame: np.ndarray, index: np.ndarray) -> np.ndarray:
    return (render_index(index).astype(bool) != frame[None]).sum((-2, -1))


def nearest_grid_image(frame: np.ndarray, scales_per_shape: int = 2, keep: int = 6) -> tuple[int, int]:
    """The grid index whose image is closest to a bool frame, and its mismatched pixels.

    Coarse to fine, instead of 737,280 comparisons: (1) per shape, the scales whose sprite area
    is nearest the frame's; (2) all 40 orientations of those, each placed at the grid position
    implied by the centroids; (3) the ``keep`` best, tried at the 3x3 neighbouring positions.
    """
    m = _moments(frame[None])[0]
    t = _template_moments()  # [shape, scale, orientation, moment]
    area_gap = np.abs(t[..., 0].mean(-1) - m[0])  # [shape, scale]
    scales = np.argsort(area_gap, axis=1)[:, :scales_per_shape]
    shape_i, scale_i, orient_i = (a.ravel() for a in np.meshgrid(np.arange(3), np.arange(scales_per_shape),
                                                                  np.arange(40), indexing="ij"))
    scale_i = scales[shape_i, scale_i]
    pos_x, pos_y = _implied_positions(m, t[shape_i, scale_i, orient_i])
    base = GRID_STRIDES[1] * shape_i + GRID_STRIDES[2] * scale_i + GRID_STRIDES[3] * orient_i
    coarse = _mismatches(frame, base + GRID_STRIDES[4] * pos_x + pos_y)
    best = np.argsort(coarse, kind="stable")[:keep]
    offsets = np.array([-1, 0, 1])
    nx = np.clip(pos_x[best, None, None] + offsets[None, :, None], 0, 31)
    ny = np.clip(pos_y[best, None, None] + offsets[None, None, :], 0, 31)
    index = (base[best, None, None] + GRID_STRIDES[4] * nx + ny).ravel()
    fine = _mismatches(frame, index)
    k = int(np.argmin(fine))
    return int(index[k]), int(fine[k])


def compare_to_official_frames(gif_path: Path, progress: bool = False) -> list[tuple[int, int, int]]:
    """For every frame of the official animation: (frame, mismatched pixels, nearest grid index)."""
    frames = read_gif_frames(Path(gif_path))
    report = []
    start = time.monotonic()
    for i, frame in enumerate(frames):
        index, mismatches = nearest_grid_image(frame)
        report.append((i, mismatches, index))
        if progress and (i + 1) % 50 == 0:
            print(f"[dsprites] compared {i + 1}/{len(frames)} frames ({time.monotonic() - start:.1f} s)",
                  file=sys.stderr)
    return report


def summarise_comparison(report: list[tuple[int, int, int]], tolerance: int = 16) -> str:
    """Per-shape summary lines of a comparison report (printed by the test)."""
    lines = []
    for k, name in enumerate(SHAPE_NAMES):
        rows = [r for r in report if grid_classes(r[2])[1] == k]
        if not rows:
            continue
        mism = np.array([r[1] for r in rows])
        lines.append(f"{name:8s} frames={len(rows):3d} within {tolerance}px={np.mean(mism <= tolerance):6.1%} "
                     f"mismatched px: total={mism.sum()} mean={mism.mean():.2f} max={mism.max()}")
    return "\n".join(lines)
