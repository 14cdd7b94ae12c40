"""Raw arrays inside the official files, read without loading them whole (DisLib converters).

An ``ArraySpec`` names an array inside a file (path, byte offset, dtype, shape) and opens it as a
read-only memmap; it holds no data, so it pickles cheaply to the shard-writing processes, which
reopen it lazily. ``npz_array`` maps an npz member in place when it is stored, or streams a
compressed member block by block into a cache folder first (memory stays bounded whatever the
dataset size). ``safe_load_metadata`` is the one pickle accepted: dSprites' metadata dict,
through an unpickler that builds only plain containers and numeric numpy arrays.

Every malformed input is a ``UserError`` "<file>: <problem>".
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import UserError
from trainer.files import write_with_atomic

BLOCK_BYTES = 64 << 20  # streaming copy block: bounded memory whatever the dataset size


# ---- raw arrays on disk -------------------------------------------------------------------------
@dataclass(frozen=True)
class ArraySpec:
    """A raw array inside a file, opened as a read-only memmap (picklable: no data inside)."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    order: str = "C"

    def open(self) -> np.ndarray:
        return _open_memmap(self)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@functools.lru_cache(maxsize=64)
def _open_memmap(spec: ArraySpec) -> np.ndarray:
    """One memmap per spec per process (workers reopen lazily instead of receiving data)."""
    return np.memmap(spec.path, dtype=np.dtype(spec.dtype), mode="r", offset=spec.offset, shape=spec.shape,
                     order=spec.order)


def close_memmaps() -> None:
    """Forget this process's open memmaps (before their cache files are deleted or reused)."""
    _open_memmap.cache_clear()


def check_length(spec: ArraySpec, label: str) -> None:
    size = os.path.getsize(spec.path)
    if size < spec.offset + spec.nbytes:
        raise UserError(f"{label}: truncated ({size} bytes, need {spec.offset + spec.nbytes} for "
                        f"{spec.dtype} {spec.shape})")


def save_npy(path: Path, array: np.ndarray) -> ArraySpec:
    """Save a small array (factors, classes) as .npy atomically and describe it."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # an open file: np.save would append ".npy" to the temp name
            np.lib.format.write_array(fh, np.ascontiguousarray(array))

    write_with_atomic(path, write)
    return npy_spec(path)


def npy_spec(path: Path) -> ArraySpec:
    """Describe the array of a plain .npy file (header only, no data read)."""
    with open(path, "rb") as fh:
        shape, fortran, dtype, _ = _read_npy_header(fh, str(path))
        offset = fh.tell()
    return ArraySpec(str(path), offset, dtype.str, shape, "F" if fortran else "C")


def _read_npy_header(fh, label: str) -> tuple[tuple[int, ...], bool, np.dtype, tuple[int, int]]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            shape, fortran, dtype = np.lib.format._read_array_header(fh, version)  # 3.0: utf-8 header
    except (ValueError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
        raise UserError(f"{label}: not a valid .npy array ({err})") from None
    return tuple(int(s) for s in shape), bool(fortran), dtype, version


# ---- npz members ----------------------------------------------------------------------------------
def _open_npz(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path}: not a readable .npz archive ({err})") from None


def _member(zf: zipfile.ZipFile, path: Path, key: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(f"{key}.npy")
    except KeyError:
        keys = ", ".join(n.removesuffix(".npy") for n in zf.namelist())
        raise UserError(f"{path}: missing key '{key}' (has: {keys})") from None


def npz_array(path: Path, key: str, cache: Path) -> ArraySpec:
    """Map an npz member without loading it: in place when stored, else via a cached raw copy."""
    label = f"{path}[{key}]"
    with _open_npz(path) as zf:
        info = _member(zf, path, key)
        with zf.open(info) as fh:
            shape, fortran, dtype, _ = _read_npy_header(fh, label)
            header_len = fh.tell()
        if dtype.hasobject:
            raise UserError(f"{label}: holds pickled Python objects, expected a numeric array")
        order = "F" if fortran else "C"
        if info.compress_type == zipfile.ZIP_STORED:
            spec = ArraySpec(str(path), _stored_data_offset(path, info) + header_len, dtype.str, shape, order)
            if info.file_size < header_len + spec.nbytes:
                raise UserError(f"{label}: truncated member ({info.file_size} bytes for {dtype} {shape})")
            check_length(spec, label)
            return spec
        return _inflate_member(zf, info, path, key, cache, ArraySpec("", header_len, dtype.str, shape, order))


def _stored_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: after its local header, name and extra field."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise UserError(f"{path}: corrupt zip local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _inflate_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, key: str, cache: Path,
                    layout: ArraySpec) -> ArraySpec:
    """Stream a compressed member into cache/<key>.npy block by block; reuse a finished copy."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{Path(path).stem}-{key}.npy"
    want = layout.offset + layout.nbytes
    if not (target.is_file() and target.stat().st_size == want):
        write_with_atomic(target, functools.partial(_copy_member, zf, info, f"{path}[{key}]", want))
    return ArraySpec(str(target), layout.offset, layout.dtype, layout.shape, layout.order)


def _copy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, label: str, want: int, tmp: Path) -> None:
    """Inflate one member into tmp; at least `want` bytes or a UserError."""
    written = 0
    try:
        with zf.open(info) as src, open(tmp, "wb") as dst:
            while block := src.read(BLOCK_BYTES):
                dst.write(block)
                written += len(block)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise UserError(f"{label}: corrupt or truncated ({err.__class__.__name__}: {err})") from None
    if written < want:
        raise UserError(f"{label}: truncated ({written} bytes, need {want})")


def npz_small_array(path: Path, key: str) -> np.ndarray:
    """Load a small numeric member fully (factor tables); never unpickles."""
    with _open_npz(path) as zf:
        _member(zf, path, key)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]
    except ValueError as err:
        raise UserError(f"{path}[{key}]: not a plain numeric array ({err})") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
        raise UserError(f"{path}[{key}]: corrupt or truncated ({err.__class__.__name__})") from None


# ---- the one pickle we accept: dSprites' metadata dict ----------------------------------------------
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only numpy arrays/dtypes/scalars; plain containers need no globals at all."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _plain(value: Any) -> bool:
    """True for dicts/lists/tuples of str/bytes/numbers and numeric numpy arrays only."""
    if value is None or isinstance(value, (str, bytes, bool, int, float, np.number, np.bool_)):
        return True
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "biuf"
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, bytes)) and _plain(v) for k, v in value.items())
    return False


def safe_load_metadata(path: Path, key: str = "metadata") -> dict:
    """Unpickle the 0-d object array ``key`` of an npz with a restricted unpickler -> dict."""
    label = f"{path}[{key}]"
    with _open_npz(path) as zf:
        info = _member(zf, path, key)
        try:
            with zf.open(info) as fh:
                shape, _, dtype, _ = _read_npy_header(fh, label)
                if not dtype.hasobject:
                    raise UserError(f"{label}: expected a pickled dict, got a {dtype} array")
                payload = fh.read()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
            raise UserError(f"{label}: corrupt or truncated ({err.__class__.__name__})") from None
    try:
        obj = _RestrictedUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise UserError(f"{label}: unexpected pickled content ({err})") from None
    except Exception as err:  # malformed pickle streams raise many types
        raise UserError(f"{label}: unreadable pickle ({err.__class__.__name__})") from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj[()]
    if not isinstance(obj, dict) or not _plain(obj):
        raise UserError(f"{label}: expected a dict of plain values, got {type(obj).__name__}")
    return {as_text(k): v for k, v in obj.items()}


def as_text(value: Any) -> str:
    """A metadata key or name as str (Python 2 pickles hold bytes)."""
    return value.decode("latin1") if isinstance(value, bytes) else str(value)
