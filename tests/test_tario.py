"""The fast tar reader against the standard library on every header kind it meets, and its strictness."""

from __future__ import annotations

import io
import tarfile

import pytest

from trainer.data.tario import group_samples, split_name, tar_members


def _tar(fmt: int, members: dict[str, bytes], with_dir: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        if with_dir:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


LONG = "x" * 40 + "/" + "y" * 120 + "/000017.factors.npy"
MEMBERS = {"000001.png": b"\x89PNG" + bytes(range(256)) * 3, "000001.cls": b"2", "000002.cls": b"",
           "sub/dir/000003.seg.png": b"abc" * 200, LONG: b"long" * 10}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else {k: v for k, v in MEMBERS.items() if k != LONG}
    raw = _tar(fmt, members, with_dir=True)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    got = [(m["fname"], m["data"]) for m in tar_members(io.BytesIO(raw))]
    assert got == expected and len(got) == len(members)


def test_grouping_like_webdataset():
    raw = _tar(tarfile.GNU_FORMAT, MEMBERS)
    samples = list(group_samples(tar_members(io.BytesIO(raw)), "u.tar"))
    assert [s["__key__"] for s in samples] == ["000001", "000002", "sub/dir/000003", LONG[:-len(".factors.npy")]]
    assert samples[0]["cls"] == b"2" and samples[0]["__url__"] == "u.tar" and samples[1]["cls"] == b""
    assert set(samples[2]) == {"__key__", "__url__", "seg.png"}
    assert split_name("a.b/c.d.e") == ("a.b/c", "d.e") and split_name("nodot") == ("nodot", "")


def test_duplicate_field_is_refused():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for data in (b"a", b"b"):  # the same member name twice
            info = tarfile.TarInfo("1.png")
            info.size = 1
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="1.png: the field appears twice in sample 1"):
        list(group_samples(tar_members(io.BytesIO(out.getvalue())), "u.tar"))


def test_bad_checksum_mid_archive_raises():
    raw = bytearray(_tar(tarfile.USTAR_FORMAT, {"1.png": b"a" * 600, "2.png": b"b"}))
    second = raw.index(b"2.png")
    raw[second + 1] ^= 0x01
    with pytest.raises(tarfile.ReadError, match="bad header checksum at byte 1536"):
        list(tar_members(io.BytesIO(bytes(raw))))


@pytest.mark.parametrize("cut", [700, 1600, 1536 + 100])
def test_truncation_raises_after_the_whole_members(cut):
    raw = _tar(tarfile.USTAR_FORMAT, {"1.png": b"a" * 600, "2.png": b"b" * 30})
    got = []
    with pytest.raises(tarfile.ReadError, match="cut short"):
        for m in tar_members(io.BytesIO(raw[:cut])):
            got.append(m["fname"])
    assert got == ([] if cut < 1536 else ["1.png"])


def test_garbage_size_field_raises():
    raw = bytearray(_tar(tarfile.USTAR_FORMAT, {"1.png": b"a"}))
    raw[124:136] = b"zzzzzzzzzzz\0"
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(bytes(raw))))
