"""The shard contract: writing, parallel + resumable building, manifest validation, splits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from trainer.data.convert.shards import STATE_NAME, build_shards, split_indices, write_manifest, write_shard
from trainer.data.shards import (Manifest, ShardInfo, file_sha256, load_manifest, make_factor, shard_urls,
                                 verify_shards)
from trainer.errors import UserError

try:
    from fabricate import toy_image, toy_sample, toy_sample_or_skip
except ImportError:  # tests/ imported as a package
    from tests.fabricate import toy_image, toy_sample, toy_sample_or_skip


def read_tar(path: Path) -> list[dict]:
    return list(wds.WebDataset(str(path), shardshuffle=False).decode("l8"))


def test_write_shard_round_trip_and_deterministic_sha(tmp_path):
    samples = [toy_sample(i) for i in range(5)]
    info = write_shard(tmp_path / "train-000000.tar", samples)
    again = write_shard(tmp_path / "again.tar", [toy_sample(i) for i in range(5)])
    assert info == ShardInfo("train-000000.tar", 5, file_sha256(tmp_path / "train-000000.tar"))
    assert again.sha256 == info.sha256  # fixed mtime: same samples -> same bytes
    got = read_tar(tmp_path / "train-000000.tar")
    assert [s["__key__"] for s in got] == [str(i) for i in range(5)]
    for i, s in enumerate(got):
        np.testing.assert_array_equal(s["factors.npy"], toy_sample(i)["factors.npy"])
        assert s["factors.npy"].dtype == np.float32
        assert s["cls"] == i % 3
        np.testing.assert_array_equal(s["png"], toy_image(i))  # decoded to a uint8 ndarray by decode("l8")
    assert not list(tmp_path.glob(".*tmp*")), "temp files left behind"


def test_the_fast_tar_writer_writes_tarfiles_bytes():
    """UstarWriter against tarfile's stream mode on the same members: sizes around the 512-byte
    blocks, empty data, the longest one-field name, a name split into ustar's prefix, non-ASCII."""
    import io
    import random
    import tarfile

    from trainer.data.convert.shards import UstarWriter, tar_member_info

    rng = random.Random(0)
    members = [(f"{'k' * 88 if i % 50 == 0 else rng.randrange(10**9)}.{field}",
                bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 511, 512, 513, 1500]))))
               for i in range(120) for field in ("cls", "factors.npy", "png")]
    members += [("é.png", b"abc"), ("a" * 60 + "/" + "x" * 60 + ".png", b"abc")]
    for subset in (members, members[:1], []):
        reference = io.BytesIO()
        with tarfile.open(fileobj=reference, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in subset:
                tar.addfile(tar_member_info(name, len(data)), io.BytesIO(data))
        ours = io.BytesIO()
        writer = UstarWriter(ours)
        for name, data in subset:
            writer.add(name, data)
        writer.close()
        assert ours.getvalue() == reference.getvalue(), len(subset)


def test_build_shards_parallel_matches_serial_and_skips(tmp_path, capsys):
    splits = split_indices(23, seed=1)
    serial = build_shards(tmp_path / "a", splits, toy_sample_or_skip, samples_per_shard=4, processes=1)
    parallel = build_shards(tmp_path / "b", splits, toy_sample_or_skip, samples_per_shard=4, processes=2)
    assert serial == parallel  # same names, counts and sha256
    skipped = [str(i) for i in np.concatenate(list(splits.values())) if i % 7 == 6]
    assert sorted(serial.skipped) == sorted(skipped)
    assert "skipped" in capsys.readouterr().err
    assert [i.name for i in serial["train"]] == [f"train-{j:06d}.tar" for j in range(5)]
    for split, indices in splits.items():
        keys = [s["__key__"] for info in serial[split] for s in read_tar(tmp_path / "a" / info.name)]
        assert keys == [str(i) for i in indices if i % 7 != 6]  # shard j holds indices[j*sps:(j+1)*sps]
        assert sum(i.num_samples for i in serial[split]) == len(keys)


_calls: list[int] = []


def _counting_sample(index: int) -> dict:
    _calls.append(index)
    if index == 10 and not Path(_FAIL_FLAG[0]).exists():
        raise KeyboardInterrupt("simulated crash")
    return toy_sample(index)


_FAIL_FLAG: list[str] = [""]


def test_build_shards_resumes_after_crash(tmp_path):
    splits = {"train": np.arange(16)}
    _FAIL_FLAG[0] = str(tmp_path / "no-more-crash")
    _calls.clear()
    with pytest.raises(KeyboardInterrupt):
        build_shards(tmp_path, splits, _counting_sample, samples_per_shard=4, progress=False)
    state = json.loads((tmp_path / STATE_NAME).read_text())
    assert sorted(state["shards"]) == ["train-000000.tar", "train-000001.tar"]
    assert not (tmp_path / "train-000002.tar").exists()  # the crashed shard was never published
    first_mtime = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    Path(_FAIL_FLAG[0]).touch()
    _calls.clear()
    result = build_shards(tmp_path, splits, _counting_sample, samples_per_shard=4, progress=False)
    assert _calls == list(range(8, 16))  # only the unfinished shards were rendered again
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == first_mtime
    assert [i.num_samples for i in result["train"]] == [4, 4, 4, 4]
    # a changed plan (other shard size) invalidates the state instead of mixing layouts
    _calls.clear()
    build_shards(tmp_path, splits, _counting_sample, samples_per_shard=8, progress=False)
    assert _calls == list(range(16))


def _manifest(tmp_path: Path) -> Manifest:
    splits = split_indices(20, seed=0)
    shards = build_shards(tmp_path, splits, toy_sample, samples_per_shard=5, progress=False)
    return Manifest(dataset="toy", channels=1, image_size=8, image_format="png",
                    factors=[make_factor("a", "continuous", np.arange(20) / 20),
                             make_factor("b", "categorical", [0, 1, 2])],
                    default_factor="b", num_samples=20, seed=0, splits=Manifest.splits_from(shards),
                    skipped=list(shards.skipped), extra={"classes": ["x", "y", "z"]})


def test_manifest_round_trip_urls_and_verify(tmp_path):
    manifest = _manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest and loaded.root == tmp_path
    assert load_manifest(tmp_path / "manifest.json").splits == manifest.splits
    assert loaded.factor_index("b") == 1 and loaded.factor("b")["size"] == 3
    assert loaded.split_samples("train") == sum(i.num_samples for i in loaded.shards("train"))
    urls = shard_urls(tmp_path, loaded, "val")
    assert urls == [str(tmp_path.resolve() / i.name) for i in loaded.shards("val")]
    verify_shards(tmp_path, loaded)
    victim = tmp_path / loaded.shards("test")[0].name
    victim.write_bytes(victim.read_bytes()[:-1] + b"x")
    with pytest.raises(UserError, match=victim.name):
        verify_shards(tmp_path, loaded, "test")
    verify_shards(tmp_path, loaded, "train")  # other splits untouched
    with pytest.raises(UserError, match="no split 'nope'"):
        shard_urls(tmp_path, loaded, "nope")
    with pytest.raises(UserError, match="no factor 'zz'"):
        loaded.factor("zz")


@pytest.mark.parametrize("breakage, message", [
    (lambda p: p.unlink(), "no manifest here"),
    (lambda p: p.write_text("{not json"), "not valid JSON"),
    (lambda p: p.write_text(json.dumps({"dataset": "x"})), "missing key"),
    (lambda p: p.write_text(p.read_text().replace('"png"', '"gif"', 1)), "image_format"),
    (lambda p: (p.parent / "train-000000.tar").unlink(), "train-000000.tar is missing"),
])
def test_load_manifest_errors_name_the_file(tmp_path, breakage, message):
    write_manifest(tmp_path, _manifest(tmp_path))
    breakage(tmp_path / "manifest.json")
    with pytest.raises(UserError, match=message) as err:
        load_manifest(tmp_path)
    assert "manifest.json" in str(err.value) and "\n" not in str(err.value)


def test_split_indices_seeded_disjoint_and_complete():
    a, b, c = split_indices(1000, 3), split_indices(1000, 3), split_indices(1000, 4)
    assert {k: len(v) for k, v in a.items()} == {"train": 800, "val": 100, "test": 100}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"])
    assert np.array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(1000))
    with pytest.raises(UserError, match="fractions"):
        split_indices(10, 0, (0.5, 0.6, 0.1))


def test_progress_lines_on_stderr(tmp_path, capsys):
    t0 = time.monotonic()
    build_shards(tmp_path, {"train": np.arange(6)}, toy_sample, samples_per_shard=3)
    err = capsys.readouterr().err
    assert "train-000000.tar: 3 samples" in err and "(2/2 shards" in err
    assert time.monotonic() - t0 < 30
