"""trainer.data.npy: a shard sample's factors.npy read without pickle, each header parsed once."""

from __future__ import annotations

import io

import numpy as np
import pytest

from trainer.data.npy import NpyReader, read_npy


def npy(values: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    np.save(buf, values, **kw)
    return buf.getvalue()


def test_the_reader_reads_each_header_once_and_the_values_of_every_sample():
    reader = NpyReader()
    first, second = np.array([0.5, 1.0, 2.0]), np.array([3.0, -1.0, 7.25])
    assert reader.read(npy(first)).tolist() == first.tolist()
    known = reader._known
    assert reader.read(npy(second)).tolist() == second.tolist() and reader._known is known  # no new parse
    other = np.array([1, 2, 3, 4], dtype=np.int32)  # another header: parsed, then remembered
    assert reader.read(npy(other)).tolist() == [1, 2, 3, 4] and reader._known is not known


@pytest.mark.parametrize("data, match", [
    (npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "not numeric"),  # a pickle: never loaded
    (npy(np.array([1.0, 2.0]))[:-3], "the data holds"),                            # cut short
    (b"\x93NUMPY\x09\x00" + b"x" * 40, "not a version 1 or 2"),
    (npy(np.array(["ab"])), "not numeric"),
])
def test_anything_but_a_numeric_npy_is_refused(data, match):
    with pytest.raises(ValueError, match=match):
        NpyReader().read(data)


def test_a_known_header_with_the_wrong_length_is_parsed_and_refused():
    reader = NpyReader()
    good = npy(np.array([1.0, 2.0, 3.0]))
    reader.read(good)
    with pytest.raises(ValueError, match="the data holds"):
        reader.read(good + b"\x00" * 8)


def test_fortran_order_arrays_come_back_in_their_shape():
    values = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    assert np.array_equal(read_npy(npy(values)), values)
    reader = NpyReader()
    assert np.array_equal(reader.read(npy(values)), values) and np.array_equal(reader.read(npy(values)), values)
