"""Converters from the official DisLib files to shards + manifest (streaming, bounded memory).

One registered converter per dataset (dsprites, shapes3d, mpi3d, cars3d, smallnorb) reads the
official file(s) and returns a ``Prepared``: the images as raw arrays on disk (``ArraySpec``,
memory-mapped, never loaded whole), the factor values and default classes (small, cached as
.npy) and the factor descriptions. ``convert`` then splits 80/10/10 by sample (seeded) and lets
``build_shards`` PNG-encode every image in parallel worker processes.

Images already stored raw in the source (an uncompressed npz member, a contiguous HDF5
dataset, the smallNORB .mat binaries) are mapped in place; compressed ones are first streamed,
block by block, into ``<out>/.cache/`` (deleted once the manifest is written). Every malformed
input is a ``UserError`` "<file>: <problem>". The files each converter accepts and what it
writes: docs/data-formats.md. Reading arrays inside those files: ``trainer.data.convert.arrays``.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from trainer.data.convert.arrays import (BLOCK_BYTES, ArraySpec, as_text, check_length, close_memmaps, npy_spec,
                                         npz_array, npz_small_array, safe_load_metadata, save_npy)
from trainer.data.convert.dsprites import SHAPE_NAMES, encode_binary_png
from trainer.data.convert.shards import build_shards, split_indices, write_manifest
from trainer.data.shards import Factor, Manifest, make_factor
from trainer.errors import UserError
from trainer.files import write_with_atomic

IMAGE_SIZE = 64
CACHE_DIR = ".cache"


# ---- what a converter hands to the shard writer ----------------------------------------------------
@dataclass
class Prepared:
    """A dataset ready to shard: images on disk, factors/classes cached, factor descriptions."""

    images: list[ArraySpec]                # concatenated along axis 0 (smallNORB: train + test)
    factors: np.ndarray                     # [N, F] float32 values
    cls: np.ndarray                         # [N] int64 default-factor class
    factor_specs: list[Factor]
    default_factor: str
    channels: int
    to_png: Callable[[np.ndarray], bytes]   # one raw image -> PNG bytes (module-level: picklable)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(spec.shape[0] for spec in self.images)


@dataclass(frozen=True)
class _SampleSource:
    images: tuple[ArraySpec, ...]
    factors: ArraySpec
    cls: ArraySpec
    to_png: Callable[[np.ndarray], bytes]

    def image(self, index: int) -> np.ndarray:
        for spec in self.images:
            if index < spec.shape[0]:
                return np.asarray(spec.open()[index])
            index -= spec.shape[0]
        raise IndexError(index)


def _dislib_sample(source: _SampleSource, index: int) -> dict:
    return {"__key__": str(index), "png": source.to_png(source.image(index)),
            "factors.npy": np.asarray(source.factors.open()[index], dtype=np.float32),
            "cls": int(source.cls.open()[index])}


def png_gray(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def png_rgb(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def png_binary(image: np.ndarray) -> bytes:
    return encode_binary_png(np.asarray(image) > 0)


def resize_antialiased(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Lanczos down-sampling (PIL's antialias filter), as disentanglement_lib does."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def png_smallnorb_left(pair: np.ndarray) -> bytes:
    """smallNORB stereo pair (2, 96, 96) -> left image, 64x64, grayscale PNG."""
    return png_gray(resize_antialiased(np.asarray(pair[0])))


# ---- registry ------------------------------------------------------------------------------------
Converter = Callable[..., Prepared]
CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        CONVERTERS[name] = fn
        return fn
    return register


def create_converter(name: str) -> Converter:
    if name not in CONVERTERS:
        raise UserError(f"no converter for dataset '{name}' (known: {', '.join(sorted(CONVERTERS))})")
    return CONVERTERS[name]


def convert(dataset: str, src: Path, out_dir: Path, *, seed: int = 0, samples_per_shard: int = 10000,
            processes: int = 1, progress: bool = True, mpi3d_sizes: Sequence[int] | None = None) -> Manifest:
    """Convert the official file(s) at ``src`` into shards + manifest under ``out_dir``.

    ``mpi3d_sizes`` overrides MPI3D's factor sizes (only for tiny fabricated files in tests; the
    real files' sizes are inferred from their length). Rerunning resumes unfinished shards.
    """
    converter = create_converter(dataset)
    src, out_dir = Path(src), Path(out_dir)
    if not src.exists():
        raise UserError(f"{src}: not found (the official {dataset} file or folder)")
    cache = out_dir / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    close_memmaps()
    options = {"mpi3d_sizes": mpi3d_sizes} if dataset == "mpi3d" else {}
    prepared = converter(src, cache, **options)
    _check_prepared(prepared, dataset)
    source = _SampleSource(tuple(prepared.images), save_npy(cache / "factors.npy", prepared.factors.astype(np.float32)),
                           save_npy(cache / "cls.npy", prepared.cls.astype(np.int64)), prepared.to_png)
    splits = split_indices(prepared.num_samples, seed)
    shards = build_shards(out_dir, splits, functools.partial(_dislib_sample, source),
                          samples_per_shard=samples_per_shard, processes=processes, progress=progress)
    manifest = Manifest(dataset=dataset, channels=prepared.channels, image_size=IMAGE_SIZE, image_format="png",
                        factors=prepared.factor_specs, default_factor=prepared.default_factor,
                        num_samples=sum(len(v) for v in splits.values()) - len(shards.skipped), seed=seed,
                        splits=Manifest.splits_from(shards), skipped=list(shards.skipped),
                        extra={"source": str(src), **prepared.extra})
    write_manifest(out_dir, manifest)
    close_memmaps()  # the cache files go away now; a later run may reuse their names
    shutil.rmtree(cache, ignore_errors=True)  # raw copies can be gigabytes
    return manifest


def _check_prepared(p: Prepared, dataset: str) -> None:
    n = p.num_samples
    if p.factors.shape != (n, len(p.factor_specs)) or p.cls.shape != (n,):
        raise AssertionError(f"{dataset} converter: factors {p.factors.shape} / cls {p.cls.shape} for {n} images")


def _discretise(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column values -> (sorted unique grid, class index of every row)."""
    grid, classes = np.unique(values, return_inverse=True)
    return grid, classes.astype(np.int64)


def _find(src: Path, patterns: Sequence[str], what: str) -> Path:
    """src itself when it is a file, else the first file in src matching one of patterns."""
    if src.is_file():
        return src
    for pattern in patterns:
        hits = sorted(src.glob(pattern))
        if hits:
            return hits[0]
    raise UserError(f"{src}: no {what} found (looked for {', '.join(patterns)})")


# ---- dSprites --------------------------------------------------------------------------------------
DSPRITES_KINDS = {"color": "categorical", "shape": "categorical", "orientation": "periodic"}


@register_converter("dsprites")
def prepare_dsprites(src: Path, cache: Path) -> Prepared:
    path = _find(src, ["dsprites_ndarray_*.npz", "*.npz"], "dSprites .npz")
    meta = safe_load_metadata(path)
    for key in ("latents_sizes", "latents_names", "latents_possible_values"):
        if key not in meta:
            raise UserError(f"{path}[metadata]: missing '{key}'")
    names = [as_text(n) for n in meta["latents_names"]]
    sizes = [int(s) for s in np.asarray(meta["latents_sizes"]).ravel()]
    possible = {as_text(k): np.asarray(v, dtype=np.float64).ravel() for k, v in meta["latents_possible_values"].items()}
    images = npz_array(path, "imgs", cache)
    values = npz_small_array(path, "latents_values")
    classes = npz_small_array(path, "latents_classes")
    n = int(np.prod(sizes))
    if len(names) != len(sizes) or any(name not in possible for name in names):
        raise UserError(f"{path}[metadata]: latents_names {names} do not match sizes/possible values")
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or images.shape[0] != n:
        raise UserError(f"{path}[imgs]: shape {images.shape}, expected ({n}, 64, 64) from latents_sizes {sizes}")
    for key, table in (("latents_values", values), ("latents_classes", classes)):
        if table.shape != (n, len(names)):
            raise UserError(f"{path}[{key}]: shape {table.shape}, expected ({n}, {len(names)})")
    if "shape" not in names:
        raise UserError(f"{path}[metadata]: no 'shape' latent")
    factors = [make_factor(name, DSPRITES_KINDS.get(name, "continuous"), possible[name]) for name in names]
    return Prepared(images=[images], factors=values.astype(np.float32), cls=classes[:, names.index("shape")],
                    factor_specs=factors, default_factor="shape", channels=1, to_png=png_binary,
                    extra={"classes": list(SHAPE_NAMES), "file": path.name})


# ---- Shapes3D -------------------------------------------------------------------------------------
SHAPES3D_NAMES = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
SHAPES3D_KINDS = ("periodic", "periodic", "periodic", "continuous", "categorical", "continuous")


@register_converter("shapes3d")
def prepare_shapes3d(src: Path, cache: Path) -> Prepared:
    import h5py

    path = _find(src, ["3dshapes.h5", "*.h5", "*.hdf5"], "Shapes3D .h5")
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{path}: not a readable HDF5 file ({err})") from None
    with fh:
        for key in ("images", "labels"):
            if key not in fh:
                raise UserError(f"{path}: missing dataset '{key}' (has: {', '.join(fh.keys())})")
        images, labels = fh["images"], fh["labels"]
        n = images.shape[0]
        if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or images.dtype != np.uint8:
            raise UserError(f"{path}[images]: {images.dtype} {images.shape}, expected uint8 (N, 64, 64, 3)")
        if labels.shape != (n, len(SHAPES3D_NAMES)):
            raise UserError(f"{path}[labels]: shape {labels.shape}, expected ({n}, 6)")
        table = _read_h5(labels, path)
        spec = _h5_images(images, path, cache)
    grids, classes = zip(*(_discretise(table[:, j]) for j in range(table.shape[1])))
    factors = [make_factor(name, kind, grid) for name, kind, grid in zip(SHAPES3D_NAMES, SHAPES3D_KINDS, grids)]
    return Prepared(images=[spec], factors=table.astype(np.float32), cls=classes[SHAPES3D_NAMES.index("shape")],
                    factor_specs=factors, default_factor="shape", channels=3, to_png=png_rgb,
                    extra={"file": path.name})


def _read_h5(dataset, path: Path) -> np.ndarray:
    try:
        return np.asarray(dataset[()], dtype=np.float64)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}[{dataset.name}]: unreadable ({err})") from None


def _h5_images(dataset, path: Path, cache: Path) -> ArraySpec:
    """Map a contiguous uncompressed dataset in place; otherwise copy it block by block."""
    offset = dataset.id.get_offset()
    spec = ArraySpec(str(path), int(offset or 0), dataset.dtype.str, tuple(dataset.shape))
    if offset is not None and dataset.chunks is None and not dataset.compression:
        check_length(spec, f"{path}[images]")
        return spec
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{path.stem}-images.npy"
    write_with_atomic(target, functools.partial(_copy_h5, dataset, path))
    return npy_spec(target)


def _copy_h5(dataset, path: Path, tmp: Path) -> None:
    """Copy an HDF5 dataset into a new .npy at tmp, a block of rows at a time."""
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dataset.dtype, shape=tuple(dataset.shape))
    rows = max(1, BLOCK_BYTES // max(1, int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize))
    try:
        for start in range(0, dataset.shape[0], rows):
            out[start:start + rows] = dataset[start:start + rows]
    except (OSError, ValueError) as err:
        raise UserError(f"{path}[images]: unreadable ({err})") from None
    finally:
        out.flush()
        del out


# ---- MPI3D ------------------------------------------------------------------------------------------
MPI3D_NAMES = ("object_color", "object_shape", "object_size", "camera_height", "background_color",
               "horizontal_axis", "vertical_axis")
MPI3D_KINDS = ("categorical", "categorical", "continuous", "continuous", "categorical", "continuous",
               "continuous")
MPI3D_SIZES = {1036800: (6, 6, 2, 3, 3, 40, 40), 460800: (4, 4, 2, 3, 3, 40, 40)}


@register_converter("mpi3d")
def prepare_mpi3d(src: Path, cache: Path, mpi3d_sizes: Sequence[int] | None = None) -> Prepared:
    path = _find(src, ["mpi3d_*.npz", "*.npz"], "MPI3D .npz")
    images = npz_array(path, "images", cache)
    n = images.shape[0]
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise UserError(f"{path}[images]: shape {images.shape}, expected (N, 64, 64, 3)")
    sizes = tuple(mpi3d_sizes) if mpi3d_sizes else MPI3D_SIZES.get(n)
    if sizes is None or len(sizes) != len(MPI3D_NAMES) or int(np.prod(sizes)) != n:
        known = " or ".join(f"{k} ({list(v)})" for k, v in MPI3D_SIZES.items())
        raise UserError(f"{path}[images]: {n} images match no MPI3D layout (expected {known})")
    classes = np.stack(np.unravel_index(np.arange(n), sizes), axis=1)  # C order, last factor fastest
    factors = [make_factor(name, kind, np.arange(size)) for name, kind, size in zip(MPI3D_NAMES, MPI3D_KINDS, sizes)]
    return Prepared(images=[images], factors=classes.astype(np.float32), cls=classes[:, 1], factor_specs=factors,
                    default_factor="object_shape", channels=3, to_png=png_rgb,
                    extra={"file": path.name, "variant": path.stem.removeprefix("mpi3d_"), "sizes": list(sizes)})


# ---- Cars3D -----------------------------------------------------------------------------------------
CARS3D_VIEW_SHAPE = (128, 128, 3, 24, 4)  # H, W, RGB, azimuth, elevation


@register_converter("cars3d")
def prepare_cars3d(src: Path, cache: Path) -> Prepared:
    folder = src if src.is_dir() else src.parent
    if (folder / "data" / "cars").is_dir():
        folder = folder / "data" / "cars"
    files = _cars3d_files(folder)
    n_cars, (n_az, n_el) = len(files), CARS3D_VIEW_SHAPE[3:]
    n = n_el * n_az * n_cars
    target = cache / "cars3d-images.npy"
    if not (target.is_file() and npy_spec(target).shape == (n, IMAGE_SIZE, IMAGE_SIZE, 3)):
        _materialise_cars(files, target, n)
    el, az, car = np.unravel_index(np.arange(n), (n_el, n_az, n_cars))
    table = np.stack([el, az, car], axis=1)
    factors = [make_factor("elevation", "continuous", np.arange(n_el)),
               make_factor("azimuth", "periodic", np.arange(n_az)),
               make_factor("car", "categorical", np.arange(n_cars))]
    return Prepared(images=[npy_spec(target)], factors=table.astype(np.float32), cls=car.astype(np.int64),
                    factor_specs=factors, default_factor="car", channels=3, to_png=png_rgb,
                    extra={"classes": [f.stem for f in files]})


def _cars3d_files(folder: Path) -> list[Path]:
    listing = folder / "list.txt"
    if listing.is_file():
        stems = [line.strip().removesuffix(".mat") for line in listing.read_text().splitlines() if line.strip()]
        files = [folder / f"{s}.mat" for s in stems]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{listing}: lists {len(missing)} missing file(s), e.g. {missing[0]}")
    else:
        files = sorted(folder.glob("car_*_mesh.mat"))
    if not files:
        raise UserError(f"{folder}: no car_XXX_mesh.mat files found")
    return files


def _materialise_cars(files: list[Path], target: Path, n: int) -> None:
    """Resize every view of every car once into a raw cache (index: elevation, azimuth, car)."""
    write_with_atomic(target, functools.partial(_resize_cars, files, n))


def _resize_cars(files: list[Path], n: int, tmp: Path) -> None:
    n_cars, n_az, n_el = len(files), CARS3D_VIEW_SHAPE[3], CARS3D_VIEW_SHAPE[4]
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, IMAGE_SIZE, IMAGE_SIZE, 3))
    try:
        for c, path in enumerate(files):
            im = _read_car(path)
            for e in range(n_el):
                for a in range(n_az):
                    out[(e * n_az + a) * n_cars + c] = resize_antialiased(np.ascontiguousarray(im[:, :, :, a, e]))
            if (c + 1) % 20 == 0:
                print(f"[cars3d] resized {c + 1}/{n_cars} cars", file=sys.stderr)
    finally:
        out.flush()
        del out


def _read_car(path: Path) -> np.ndarray:
    """One car's 'im' array (128, 128, 3, 24, 4) uint8 from its MATLAB file."""
    import scipy.io

    try:
        im = scipy.io.loadmat(path, variable_names=["im"]).get("im")
    except (ValueError, TypeError, OSError, NotImplementedError, zlib.error) as err:
        raise UserError(f"{path}: not a readable MATLAB v5 file ({err.__class__.__name__}: {err})") from None
    if im is None:
        raise UserError(f"{path}: missing variable 'im'")
    if im.shape != CARS3D_VIEW_SHAPE or im.dtype != np.uint8:
        raise UserError(f"{path}: 'im' is {im.dtype} {im.shape}, expected uint8 {CARS3D_VIEW_SHAPE}")
    return im


# ---- smallNORB ---------------------------------------------------------------------------------------
NORB_MAGIC = {0x1E3D4C55: "u1", 0x1E3D4C54: "<i4", 0x1E3D4C51: "<f4", 0x1E3D4C53: "<f8", 0x1E3D4C56: "<i2"}
NORB_PARTS = ("training", "testing")
NORB_CATEGORIES = ("animal", "human", "airplane", "truck", "car")


def read_norb_header(path: Path) -> ArraySpec:
    """Parse a smallNORB binary header (magic, ndim, dims) and check dims against the length."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: truncated header")
            magic, ndim = struct.unpack("<ii", head)
            if magic not in NORB_MAGIC:
                raise UserError(f"{path}: bad magic number 0x{magic & 0xFFFFFFFF:08X}")
            if not 1 <= ndim <= 8:
                raise UserError(f"{path}: implausible ndim {ndim}")
            raw_dims = fh.read(4 * max(3, ndim))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    if len(raw_dims) < 4 * max(3, ndim):
        raise UserError(f"{path}: truncated header")
    dims = struct.unpack(f"<{max(3, ndim)}i", raw_dims)[:ndim]
    if any(d < 0 for d in dims):
        raise UserError(f"{path}: negative dimension in {dims}")
    spec = ArraySpec(str(path), 8 + 4 * max(3, ndim), NORB_MAGIC[magic], tuple(dims))
    size = os.path.getsize(path)
    if size != spec.offset + spec.nbytes:
        raise UserError(f"{path}: {size} bytes, but its header promises {spec.offset + spec.nbytes} "
                        f"({spec.dtype} {spec.shape}): truncated or mismatched")
    return spec


def _norb_file(folder: Path, part: str, kind: str) -> Path:
    hits = sorted(folder.glob(f"smallnorb-*-{part}-{kind}.mat"))
    if not hits:
        raise UserError(f"{folder}: missing smallnorb-...-{part}-{kind}.mat")
    return hits[0]


@register_converter("smallnorb")
def prepare_smallnorb(src: Path, cache: Path) -> Prepared:
    folder = src if src.is_dir() else src.parent
    images, tables = [], []
    for part in NORB_PARTS:
        dat, cat, info = (read_norb_header(_norb_file(folder, part, k)) for k in ("dat", "cat", "info"))
        _expect(dat, "u1", 4, lambda s: s[1:] == (2, 96, 96), "uint8 (N, 2, 96, 96)")
        _expect(cat, "<i4", 1, lambda s: True, "int32 (N,)")
        _expect(info, "<i4", 2, lambda s: s[1] == 4, "int32 (N, 4)")
        if not dat.shape[0] == cat.shape[0] == info.shape[0]:
            raise UserError(f"{cat.path}: {cat.shape[0]} labels for {dat.shape[0]} images in {Path(dat.path).name}")
        labels = np.asarray(info.open())
        tables.append(np.column_stack([np.asarray(cat.open()), labels[:, 1], labels[:, 2], labels[:, 3]]))
        images.append(dat)
    table = np.concatenate(tables).astype(np.int64)
    names, kinds = ("category", "elevation", "azimuth", "lighting"), ("categorical", "continuous", "periodic",
                                                                     "categorical")
    grids, classes = zip(*(_discretise(table[:, j]) for j in range(4)))
    factors = [make_factor(nm, kd, grid) for nm, kd, grid in zip(names, kinds, grids)]
    return Prepared(images=images, factors=table.astype(np.float32), cls=classes[0], factor_specs=factors,
                    default_factor="category", channels=1, to_png=png_smallnorb_left,
                    extra={"classes": list(NORB_CATEGORIES), "parts": {p: s.shape[0] for p, s in zip(NORB_PARTS, images)}})


def _expect(spec: ArraySpec, dtype: str, ndim: int, dims_ok: Callable[[tuple], bool], what: str) -> None:
    if spec.dtype != dtype or len(spec.shape) != ndim or not dims_ok(spec.shape):
        raise UserError(f"{spec.path}: holds {np.dtype(spec.dtype)} {spec.shape}, expected {what}")
