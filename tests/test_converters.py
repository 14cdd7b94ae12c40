"""DisLib converters: tiny files in the official formats -> shards; every factor of every sample
is checked, and every malformed input is a one-line UserError naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from trainer.data.convert import dislib
from trainer.data.shards import load_manifest, verify_shards
from trainer.errors import UserError

try:
    import fabricate as fab
except ImportError:  # tests/ imported as a package
    from tests import fabricate as fab


def read_back(out: Path) -> tuple[dict[int, dict], object]:
    """All samples of all splits, by numeric key, images decoded to uint8 arrays."""
    manifest = load_manifest(out)
    verify_shards(out, manifest)
    mode = "l8" if manifest.channels == 1 else "rgb8"
    samples: dict[int, dict] = {}
    for split in manifest.splits:
        urls = [str(out / i.name) for i in manifest.shards(split)]
        for s in wds.WebDataset(urls, shardshuffle=False).decode(mode):
            assert int(s["__key__"]) not in samples, "a key appears in two splits"
            samples[int(s["__key__"])] = s
    assert len(samples) == manifest.num_samples
    assert not (out / dislib.CACHE_DIR).exists(), "raw cache left behind"
    return samples, manifest


def check_error(fn, *match: str) -> str:
    with pytest.raises(UserError) as err:
        fn()
    text = str(err.value)
    assert "\n" not in text
    for m in match:
        assert m in text, text
    return text


# ---- dSprites --------------------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [True, False])
def test_dsprites_every_sample(tmp_path, compressed):
    src = tmp_path / "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
    want = fab.fabricate_dsprites_npz(src, compressed=compressed)
    manifest = dislib.convert("dsprites", tmp_path, tmp_path / "out", samples_per_shard=10, progress=False,
                              processes=2 if compressed else 1)
    samples, loaded = read_back(tmp_path / "out")
    assert loaded == manifest and manifest.num_samples == 48 and manifest.channels == 1
    assert manifest.factor_names == ["color", "shape", "scale", "orientation", "posX", "posY"]
    assert [f["kind"] for f in manifest.factors] == ["categorical", "categorical", "continuous", "periodic",
                                                     "continuous", "continuous"]
    assert manifest.factor("scale")["values"] == [0.5, 1.0] and manifest.default_factor == "shape"
    for key, s in samples.items():
        np.testing.assert_array_equal(s["png"], want["imgs"][key] * 255)
        np.testing.assert_array_equal(s["factors.npy"], want["latents_values"][key].astype(np.float32))
        assert s["cls"] == want["latents_classes"][key, 1]


@pytest.mark.parametrize("kwargs, match", [
    ({"metadata": fab.PickleBomb()}, "unexpected pickled content"),
    ({"metadata": {"latents_sizes": {1, 2}}}, "plain values"),
    ({"metadata": [1, 2, 3]}, "expected a dict"),
    ({"metadata": {"latents_sizes": np.array([1, 3, 2, 2, 2, 2])}}, "missing 'latents_names'"),
    ({"drop": "latents_classes"}, "missing key 'latents_classes'"),
    ({"drop": "metadata"}, "missing key 'metadata'"),
    ({"imgs_shape": (48, 32, 32)}, "expected (48, 64, 64)"),
])
def test_dsprites_malformed(tmp_path, kwargs, match):
    src = tmp_path / "d.npz"
    fab.fabricate_dsprites_npz(src, **kwargs)
    check_error(lambda: dislib.convert("dsprites", src, tmp_path / "out", progress=False), str(src), match)


def test_dsprites_truncated_and_not_a_zip(tmp_path):
    src = tmp_path / "d.npz"
    fab.fabricate_dsprites_npz(src, compressed=False)
    src.write_bytes(src.read_bytes()[:60000])
    check_error(lambda: dislib.convert("dsprites", src, tmp_path / "out", progress=False), str(src))
    src.write_bytes(b"hello")
    check_error(lambda: dislib.convert("dsprites", src, tmp_path / "out", progress=False), str(src), "npz")


def test_pickle_bomb_is_never_called(tmp_path, monkeypatch):
    calls = []
    src = tmp_path / "d.npz"
    fab.fabricate_dsprites_npz(src, metadata=fab.PickleBomb())  # pickles a reference to posix.getcwd
    monkeypatch.setattr("posix.getcwd", lambda: calls.append(1) or "/")
    with pytest.raises(UserError):
        dislib.safe_load_metadata(src)
    assert calls == []


# ---- Shapes3D -------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [True, False])
def test_shapes3d_every_sample(tmp_path, chunked):
    src = tmp_path / "3dshapes.h5"
    want = fab.fabricate_shapes3d_h5(src, chunked=chunked)
    manifest = dislib.convert("shapes3d", src, tmp_path / "out", samples_per_shard=16, progress=False)
    samples, _ = read_back(tmp_path / "out")
    assert manifest.factor_names == ["floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation"]
    assert [f["kind"] for f in manifest.factors][:3] == ["periodic"] * 3
    assert [f["size"] for f in manifest.factors] == [2, 1, 2, 2, 4, 2]
    assert manifest.default_factor == "shape" and manifest.channels == 3
    for key, s in samples.items():
        np.testing.assert_array_equal(s["png"], want["images"][key])
        np.testing.assert_array_equal(s["factors.npy"], want["labels"][key].astype(np.float32))
        assert s["cls"] == int(want["labels"][key, 4])  # shapes 0..3 -> class = value


@pytest.mark.parametrize("drop", ["images", "labels"])
def test_shapes3d_malformed(tmp_path, drop):
    src = tmp_path / "3dshapes.h5"
    fab.fabricate_shapes3d_h5(src, drop=drop)
    check_error(lambda: dislib.convert("shapes3d", src, tmp_path / "out", progress=False),
                str(src), f"missing dataset '{drop}'")
    src.write_bytes(b"not hdf5")
    check_error(lambda: dislib.convert("shapes3d", src, tmp_path / "out", progress=False), str(src), "HDF5")


# ---- MPI3D ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True])
def test_mpi3d_every_sample(tmp_path, compressed):
    src = tmp_path / "mpi3d_toy.npz"
    images = fab.fabricate_mpi3d_npz(src, compressed=compressed)
    manifest = dislib.convert("mpi3d", src, tmp_path / "out", samples_per_shard=16, progress=False,
                              mpi3d_sizes=fab.MPI3D_TINY_SIZES)
    samples, _ = read_back(tmp_path / "out")
    assert manifest.factor_names == list(dislib.MPI3D_NAMES) and manifest.default_factor == "object_shape"
    assert manifest.extra["variant"] == "toy"
    for key, s in samples.items():
        np.testing.assert_array_equal(s["png"], images[key])
        want = np.array(np.unravel_index(key, fab.MPI3D_TINY_SIZES), dtype=np.float32)
        np.testing.assert_array_equal(s["factors.npy"], want)
        assert s["cls"] == want[1]


def test_mpi3d_length_matches_no_layout(tmp_path):
    src = tmp_path / "mpi3d_real.npz"
    fab.fabricate_mpi3d_npz(src, extra_images=1)
    check_error(lambda: dislib.convert("mpi3d", src, tmp_path / "out", progress=False), str(src),
                "49 images match no MPI3D layout", "1036800")
    check_error(lambda: dislib.convert("mpi3d", src, tmp_path / "out", progress=False,
                                       mpi3d_sizes=fab.MPI3D_TINY_SIZES), "49 images")


# ---- Cars3D ---------------------------------------------------------------------------------------
def test_cars3d_every_sample_in_list_order(tmp_path):
    folder = tmp_path / "data" / "cars"
    order = fab.fabricate_cars3d(folder, cars=2, list_order=[1, 0])
    manifest = dislib.convert("cars3d", tmp_path, tmp_path / "out", samples_per_shard=50, progress=False)
    samples, _ = read_back(tmp_path / "out")
    assert manifest.num_samples == 4 * 24 * 2 and manifest.default_factor == "car"
    assert [(f["name"], f["kind"], f["size"]) for f in manifest.factors] == [
        ("elevation", "continuous", 4), ("azimuth", "periodic", 24), ("car", "categorical", 2)]
    assert manifest.extra["classes"] == ["car_002_mesh", "car_001_mesh"]
    views = {c: fab.cars3d_views(c) for c in order}
    for key, s in samples.items():
        el, az, car = np.unravel_index(key, (4, 24, 2))
        np.testing.assert_array_equal(s["factors.npy"], [el, az, car])
        assert s["cls"] == car
        source = views[order[car]][:, :, :, az, el]
        expected = np.asarray(Image.fromarray(source).resize((64, 64), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(s["png"], expected)
        assert s["png"][0, 0, 0] < s["png"][63, 0, 0]  # the red gradient runs down the rows
        assert s["png"][5, 5, 1] == az * 10 + el and s["png"][5, 5, 2] == order[car] * 40


@pytest.mark.parametrize("bad, match", [("shape", "expected uint8 (128, 128, 3, 24, 4)"),
                                        ("missing", "missing variable 'im'"),
                                        ("garbage", "MATLAB")])
def test_cars3d_malformed(tmp_path, bad, match):
    fab.fabricate_cars3d(tmp_path, cars=1, bad=bad)
    check_error(lambda: dislib.convert("cars3d", tmp_path, tmp_path / "out", progress=False),
                "car_001_mesh.mat", match)


def test_cars3d_list_names_missing_file(tmp_path):
    fab.fabricate_cars3d(tmp_path, cars=1, list_order=[0])
    (tmp_path / "list.txt").write_text("car_001_mesh\ncar_009_mesh\n")
    check_error(lambda: dislib.convert("cars3d", tmp_path, tmp_path / "out", progress=False), "list.txt",
                "car_009_mesh.mat")


# ---- smallNORB ------------------------------------------------------------------------------------
def test_smallnorb_every_sample(tmp_path):
    want = fab.fabricate_smallnorb(tmp_path / "norb")
    manifest = dislib.convert("smallnorb", tmp_path / "norb", tmp_path / "out", samples_per_shard=4,
                              progress=False)
    samples, _ = read_back(tmp_path / "out")
    assert manifest.num_samples == 10 and manifest.channels == 1 and manifest.default_factor == "category"
    assert manifest.factor_names == ["category", "elevation", "azimuth", "lighting"]
    assert manifest.factor("azimuth")["kind"] == "periodic"
    for key, s in samples.items():
        info = want["info"][key]
        np.testing.assert_array_equal(s["factors.npy"], [want["cat"][key], info[1], info[2], info[3]])
        assert s["cls"] == want["cat"][key]
        left = Image.fromarray(want["dat"][key][0]).resize((64, 64), Image.Resampling.LANCZOS)
        np.testing.assert_array_equal(s["png"], np.asarray(left))


@pytest.mark.parametrize("bad, match", [("magic", "bad magic number 0x12345678"),
                                        ("truncated", "truncated or mismatched"),
                                        ("count", "7 labels for 6 images")])
def test_smallnorb_malformed(tmp_path, bad, match):
    fab.fabricate_smallnorb(tmp_path, bad=bad)
    check_error(lambda: dislib.convert("smallnorb", tmp_path, tmp_path / "out", progress=False),
                "smallnorb-", match)


def test_smallnorb_missing_file_and_unknown_dataset(tmp_path):
    fab.fabricate_smallnorb(tmp_path)
    next(tmp_path.glob("*testing-info.mat")).unlink()
    check_error(lambda: dislib.convert("smallnorb", tmp_path, tmp_path / "out", progress=False),
                "missing smallnorb-...-testing-info.mat")
    check_error(lambda: dislib.convert("nope", tmp_path, tmp_path / "out"), "no converter for dataset 'nope'")
    check_error(lambda: dislib.convert("dsprites", tmp_path / "absent.npz", tmp_path / "out"), "absent.npz")


def test_raw_arrays_are_mapped_in_place_or_streamed_to_cache(tmp_path):
    stored, packed, h5 = tmp_path / "s.npz", tmp_path / "c.npz", tmp_path / "x.h5"
    images = fab.fabricate_mpi3d_npz(stored, compressed=False)
    fab.fabricate_mpi3d_npz(packed, compressed=True)
    spec = dislib.npz_array(stored, "images", tmp_path / "cache")
    assert spec.path == str(stored) and not (tmp_path / "cache").exists()  # no copy of a stored member
    np.testing.assert_array_equal(spec.open(), images)
    spec = dislib.npz_array(packed, "images", tmp_path / "cache")
    assert Path(spec.path).parent == tmp_path / "cache"
    np.testing.assert_array_equal(spec.open(), images)
    import h5py
    want = fab.fabricate_shapes3d_h5(h5, chunked=False)
    with h5py.File(h5) as fh:
        spec = dislib._h5_images(fh["images"], h5, tmp_path / "cache2")
    assert spec.path == str(h5)
    np.testing.assert_array_equal(spec.open(), want["images"])
