"""The `factors.npy` of a shard sample: bytes -> numbers, never a pickle.

Both the integrity check (trainer/data/integrity.py) and the loader (trainer/data/stream.py) read
one small .npy per sample. `read_npy` parses a header without trusting it; `NpyReader` parses each
distinct header once: every sample of a converted shard carries the same header, and parsing it
took ~50 us a sample, most of a split's integrity check and ~15 % of the loader's time (py-spy).
"""

from __future__ import annotations

import io

import numpy as np

_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_npy(data: bytes) -> np.ndarray:
    """A numeric .npy from bytes, read from its header without unpickling anything and without
    trusting the shape it claims (ValueError for anything else, or for data cut short)."""
    fh = io.BytesIO(data)
    header = _NPY_HEADERS.get(np.lib.format.read_magic(fh))
    if header is None:
        raise ValueError("not a version 1 or 2 .npy header")
    shape, fortran, dtype = header(fh)
    if dtype.hasobject or dtype.kind not in "fiu":
        raise ValueError(f"dtype {dtype} is not numeric")
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize != len(data) - fh.tell():
        raise ValueError(f"the header says {shape} of {dtype}, the data holds {len(data) - fh.tell()} bytes")
    return np.frombuffer(data, dtype=dtype, count=count, offset=fh.tell()).reshape(shape, order="F" if fortran else "C")


class NpyReader:
    """read_npy with the last good header remembered: a .npy whose header is byte for byte that one
    (and whose length fits it) is read without parsing. Values come back as read-only views."""

    def __init__(self):
        # (header bytes, dtype, shape, values count, whole file length) of the last good one
        self._known: tuple[bytes, np.dtype, tuple[int, ...], int, int] | None = None

    def read(self, data: bytes) -> np.ndarray:
        known = self._known
        if known is not None:
            header, dtype, shape, count, length = known
            if len(data) == length and data.startswith(header):
                return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape)
        values = read_npy(data)
        if values.flags.c_contiguous:  # a Fortran-order header keeps the parsed path
            self._known = (data[:len(data) - values.nbytes], values.dtype, values.shape, values.size, len(data))
        return values
