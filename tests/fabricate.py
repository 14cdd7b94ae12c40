"""Fabricate tiny files in the official formats (and toy shard samples) for tests.

The real DisLib files are gigabytes and cannot be downloaded here; these helpers write a few
images in exactly the official layouts so that converters, loaders and label schemes are tested
end to end. Other engineers may reuse them: every function takes a path (and a seed where it
randomises) and returns what a test needs to check the result.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(image: np.ndarray) -> bytes:
    """PNG-encode a uint8 (H, W) or (H, W, 3) array."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def toy_image(index: int, size: int = 8) -> np.ndarray:
    """A deterministic grayscale image whose pixels encode the index (for round-trip checks)."""
    return ((np.arange(size * size).reshape(size, size) * 7 + index * 13) % 256).astype(np.uint8)


def toy_sample(index: int) -> dict:
    """A shard sample for index: png, factors [index/20, index % 3], cls = index % 3."""
    return {"__key__": str(index), "png": png_bytes(toy_image(index)),
            "factors.npy": np.array([index / 20, index % 3], dtype=np.float32), "cls": index % 3}


def toy_sample_or_skip(index: int) -> dict | None:
    """Like toy_sample, but every index with index % 7 == 6 is 'corrupt' (None = skip)."""
    return None if index % 7 == 6 else toy_sample(index)


# ---- DisLib official formats ------------------------------------------------------------------------
DSPRITES_TINY_SIZES = (1, 3, 2, 2, 2, 2)  # 48 images in the official layout


def _grid_table(grids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Row-major (last factor fastest) classes and values of a factor grid."""
    sizes = [len(g) for g in grids]
    classes = np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), axis=1)
    values = np.stack([g[classes[:, j]] for j, g in enumerate(grids)], axis=1)
    return classes.astype(np.int64), values.astype(np.float64)


def dsprites_metadata(grids: list[np.ndarray]) -> dict:
    """A metadata dict shaped like the official one (plain values and numeric arrays only)."""
    names = ("color", "shape", "scale", "orientation", "posX", "posY")
    return {"date": "April 2017", "description": "Disentanglement test Sprites dataset.", "version": 1,
            "latents_names": names, "latents_sizes": np.array([len(g) for g in grids]),
            "latents_possible_values": dict(zip(names, grids)), "author": "lmatthey@google.com",
            "title": "dSprites dataset"}


def fabricate_dsprites_npz(path: Path, *, seed: int = 0, compressed: bool = True,
                           metadata: object = "official", drop: str | None = None,
                           imgs_shape: tuple | None = None) -> dict[str, np.ndarray]:
    """A dSprites npz with 3*2*2*2*2 images; returns {'imgs', 'latents_values', 'latents_classes'}.

    metadata='official' writes the official-like dict; any other object is pickled as given
    (malformed cases); drop removes one key; imgs_shape forces a wrong image array shape.
    """
    grids = [np.array([1.0]), np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0]), np.array([0.0, np.pi]),
             np.array([0.0, 1.0]), np.array([0.0, 1.0])]
    classes, values = _grid_table(grids)
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 2, size=imgs_shape or (len(values), 64, 64), dtype=np.uint8)
    meta = dsprites_metadata(grids) if metadata == "official" else metadata
    arrays = {"imgs": imgs, "latents_values": values, "latents_classes": classes,
              "metadata": np.array(meta, dtype=object)}
    if drop:
        arrays.pop(drop)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return {"imgs": imgs, "latents_values": values, "latents_classes": classes}


class PickleBomb:
    """Unpickles to a call of os.getcwd: a stand-in for arbitrary code in a hostile file."""

    def __reduce__(self):
        return (os.getcwd, ())


SHAPES3D_TINY_GRIDS = [np.array([0.0, 0.5]), np.array([0.3]), np.array([0.1, 0.9]), np.array([0.75, 1.25]),
                       np.arange(4.0), np.array([-30.0, 30.0])]


def fabricate_shapes3d_h5(path: Path, *, seed: int = 0, chunked: bool = True,
                          drop: str | None = None) -> dict[str, np.ndarray]:
    """A 3dshapes.h5 with 64 images (orientation fastest); chunked+gzip or contiguous."""
    import h5py

    _, labels = _grid_table(SHAPES3D_TINY_GRIDS)
    images = np.random.default_rng(seed).integers(0, 256, size=(len(labels), 64, 64, 3), dtype=np.uint8)
    with h5py.File(path, "w") as fh:
        if drop != "images":
            kw = {"chunks": (8, 64, 64, 3), "compression": "gzip"} if chunked else {}
            fh.create_dataset("images", data=images, **kw)
        if drop != "labels":
            fh.create_dataset("labels", data=labels)
    return {"images": images, "labels": labels}


MPI3D_TINY_SIZES = (2, 2, 1, 1, 2, 3, 2)  # 48 images


def fabricate_mpi3d_npz(path: Path, *, seed: int = 0, sizes=MPI3D_TINY_SIZES, compressed: bool = False,
                        extra_images: int = 0) -> np.ndarray:
    """An mpi3d npz ('images' only, stored like the official files); returns the images."""
    n = int(np.prod(sizes)) + extra_images
    images = np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)
    (np.savez_compressed if compressed else np.savez)(path, images=images)
    return images


def cars3d_views(car: int) -> np.ndarray:
    """The (128, 128, 3, 24, 4) views of fabricated car number `car`: flat colour per view, a
    vertical gradient in red (catches H/W swaps), blue = car."""
    rows = np.arange(128, dtype=np.uint8)[:, None]
    im = np.zeros((128, 128, 3, 24, 4), dtype=np.uint8)
    for a in range(24):
        for e in range(4):
            im[:, :, 0, a, e] = rows * 2
            im[:, :, 1, a, e] = a * 10 + e
            im[:, :, 2, a, e] = car * 40
    return im


def fabricate_cars3d(folder: Path, *, cars: int = 2, list_order: list[int] | None = None,
                     bad: str | None = None) -> list[int]:
    """car_XXX_mesh.mat files (MATLAB v5, variable 'im' and 'mask'); optional list.txt order.

    Returns the car numbers in the order the converter must use. bad='shape' writes a wrong-shape
    'im' into the first file, bad='missing' omits 'im', bad='garbage' writes a non-MAT file.
    """
    import scipy.io

    folder.mkdir(parents=True, exist_ok=True)
    for c in range(cars):
        path = folder / f"car_{c + 1:03d}_mesh.mat"
        im = cars3d_views(c)
        if c == 0 and bad == "garbage":
            path.write_bytes(b"not a mat file at all" * 10)
            continue
        if c == 0 and bad == "shape":
            im = im[:, :, :, :12]
        content = {"mask": np.ones((128, 128, 24, 4), dtype=np.uint8)}
        if not (c == 0 and bad == "missing"):
            content["im"] = im
        scipy.io.savemat(path, content, do_compression=True)
    order = list(range(cars))
    if list_order is not None:
        (folder / "list.txt").write_text("".join(f"car_{c + 1:03d}_mesh\n" for c in list_order))
        order = list_order
    return order


NORB_MAGIC = {"uint8": 0x1E3D4C55, "int32": 0x1E3D4C54}


def write_norb(path: Path, array: np.ndarray, *, magic: int | None = None, truncate: int = 0) -> None:
    """One smallNORB binary: int32 magic, int32 ndim, max(3, ndim) int32 dims, then the data."""
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    magic = NORB_MAGIC[str(array.dtype)] if magic is None else magic
    data = struct.pack(f"<ii{len(dims)}i", magic, array.ndim, *dims) + array.astype(array.dtype.newbyteorder("<")).tobytes()
    path.write_bytes(data[:len(data) - truncate] if truncate else data)


def fabricate_smallnorb(folder: Path, *, seed: int = 0, sizes=(("training", 6), ("testing", 4)),
                        bad: str | None = None) -> dict[str, np.ndarray]:
    """The six smallNORB files for tiny training/testing parts; returns the concatenated arrays.

    bad='magic' corrupts the training-dat magic, 'truncated' cuts the testing-dat file,
    'count' writes one label too many in training-cat.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"dat": [], "cat": [], "info": []}
    for part, n in sizes:
        dat = rng.integers(0, 256, size=(n, 2, 96, 96), dtype=np.uint8)
        cat = (np.arange(n) % 5).astype(np.int32)
        info = np.stack([np.arange(n) % 10, np.arange(n) % 9, (np.arange(n) * 2) % 36, np.arange(n) % 6],
                        axis=1).astype(np.int32)
        stem = f"smallnorb-5x{'46789' if part == 'training' else '01235'}x9x18x6x2x96x96-{part}"
        write_norb(folder / f"{stem}-dat.mat", dat, magic=0x12345678 if (bad == "magic" and part == "training")
                   else None, truncate=100 if (bad == "truncated" and part == "testing") else 0)
        write_norb(folder / f"{stem}-cat.mat",
                   np.append(cat, 1).astype(np.int32) if (bad == "count" and part == "training") else cat)
        write_norb(folder / f"{stem}-info.mat", info)
        for k, v in (("dat", dat), ("cat", cat), ("info", info)):
            out[k].append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def damage_one_image(shard: Path, extension: str, damage) -> str:
    """Replace the first `extension` member of a shard by `damage(its bytes)`, keeping a valid tar
    (the manifest is left as it was: its sha256 no longer matches); return that sample's key."""
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(f".{extension}"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == victim:
                data = damage(data)
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return victim.rsplit(".", 1)[0]
