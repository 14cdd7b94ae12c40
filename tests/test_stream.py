"""Streaming loaders over real shards: batch format, exact batch counts, disjoint ranks, seeding,
subsets, resizing, evaluation order and corrupt data."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data.convert import dsprites as ds
from trainer.data.convert.shards import write_manifest, write_shard
from trainer.data.shards import Manifest, load_manifest, make_factor
from trainer.data.stream import (ShardSlice, epoch_batches, make_eval_loader, make_train_loader, split_slices,
                                 training_slices)
from trainer.errors import RuntimeFault

try:
    from fabricate import toy_sample
except ImportError:  # tests/ imported as a package
    from tests.fabricate import toy_sample


@pytest.fixture(scope="module")
def sprites(tmp_path_factory) -> Manifest:
    """240 procedural dSprites: train 192 samples in 10 shards (9 x 20 + 12), val 24, test 24."""
    root = tmp_path_factory.mktemp("sprites")
    ds.generate_dsprites(root, seed=0, samples_per_shard=20, processes=1, limit=240, progress=False)
    return load_manifest(root)


def data_cfg(manifest: Manifest, **kw) -> DataConfig:
    base = {"dataset": "dsprites", "root": str(manifest.root), "shuffle_buffer": 30, "loader_workers": 0}
    return DataConfig(**{**base, **kw})


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def shard_keys(manifest: Manifest, names: list[str]) -> set[str]:
    import webdataset as wds

    urls = [str(manifest.root / n) for n in names]
    return {s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)}


def test_batch_format_and_content(sprites):
    loader = make_train_loader(data_cfg(sprites), sprites, rank=0, world_size=1, batch_size=16, seed=0, epoch=0,
                               num_batches=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    b = batches[0]
    assert b["image"].shape == (16, 1, 64, 64) and b["image"].dtype == torch.float32
    assert 0 <= b["image"].min() and b["image"].max() == 1
    assert b["factors"].shape == (16, 6) and b["factors"].dtype == torch.float32
    assert b["cls"].dtype == torch.int64 and b["index"].dtype == torch.int64 and len(b["key"]) == 16
    for i, key in enumerate(b["key"]):
        k = int(key)
        assert b["index"][i] == k and b["cls"][i] == ds.grid_classes(k)[1]
        np.testing.assert_array_equal(b["factors"][i].numpy(), ds.grid_values(k))
        np.testing.assert_array_equal(b["image"][i, 0].numpy(), ds.render_index(k).astype(np.float32))


@pytest.mark.parametrize("workers, num_batches", [(0, 5), (2, 7), (3, 2)])
def test_exactly_num_batches_even_beyond_one_pass(sprites, workers, num_batches):
    # 192 train samples / batch 40 = 4 full batches per pass: 5 and 7 need the shards again
    loader = make_train_loader(data_cfg(sprites, loader_workers=workers), sprites, rank=0, world_size=1,
                               batch_size=40, seed=1, epoch=0, num_batches=num_batches)
    batches = list(loader)
    assert len(batches) == num_batches and all(len(b["key"]) == 40 for b in batches)


def test_ranks_read_disjoint_own_shards(sprites):
    train = [i.name for i in sprites.shards("train")]
    seen = []
    for rank in range(2):
        loader = make_train_loader(data_cfg(sprites, loader_workers=2), sprites, rank=rank, world_size=2,
                                   batch_size=8, seed=0, epoch=0, num_batches=11)
        keys = keys_of(loader)
        assert len(keys) == 88
        assert set(keys) <= shard_keys(sprites, train[rank::2])  # only this rank's shards
        seen.append(set(keys))
    assert not seen[0] & seen[1]


def test_fewer_shards_than_ranks_still_disjoint(sprites):
    cfg = data_cfg(sprites, max_samples=30, shuffle_buffer=0)  # 2 shards: 20 + 10 samples; one pass each
    # strides of 3 over both shards: ranks own 11, 10 and 9 samples; read 9 each (within one pass)
    seen = [set(keys_of(make_train_loader(cfg, sprites, rank=r, world_size=3, batch_size=3, seed=0, epoch=0,
                                          num_batches=3))) for r in range(3)]
    assert all(len(s) == 9 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_seeded_order_per_epoch(sprites):
    def order(seed, epoch):
        return keys_of(make_train_loader(data_cfg(sprites, loader_workers=2), sprites, rank=0, world_size=1,
                                         batch_size=16, seed=seed, epoch=epoch, num_batches=6))
    first = order(0, 0)
    assert first == order(0, 0)
    assert first != order(0, 1) and first != order(1, 0)
    assert len(set(first)) > 80  # a shuffle, not one shard repeated


def test_max_samples_keeps_first_samples(sprites):
    cfg = data_cfg(sprites, max_samples=25, shuffle_buffer=0)
    keys = keys_of(make_train_loader(cfg, sprites, rank=0, world_size=1, batch_size=5, seed=0, epoch=0,
                                     num_batches=5))  # one pass over the subset
    assert len(set(keys)) == 25
    first = [k for b in make_eval_loader(cfg, sprites, "train", batch_size=100, max_samples=25) for k in b["key"]]
    assert len(first) == 25 and set(keys) == set(first)
    slices = training_slices(sprites, sprites.root, 25)
    assert [s.limit for s in slices] == [None, 5]


def test_resize_and_transform(sprites):
    loader = make_train_loader(data_cfg(sprites, image_size=32), sprites, rank=0, world_size=1, batch_size=4,
                               seed=0, epoch=0, num_batches=1)
    assert next(iter(loader))["image"].shape == (4, 1, 32, 32)
    flip = lambda img: np.asarray(img)[:, ::-1]  # noqa: E731  (an ndarray HW transform)
    batch = next(iter(make_eval_loader(data_cfg(sprites), sprites, "val", batch_size=4, transform=flip)))
    k = int(batch["key"][0])
    np.testing.assert_array_equal(batch["image"][0, 0].numpy(), ds.render_index(k)[:, ::-1])


def test_eval_loader_in_order_with_partial_batch(sprites):
    loader = make_eval_loader(data_cfg(sprites), sprites, "val", batch_size=10)
    batches = list(loader)
    assert [len(b["key"]) for b in batches] == [10, 10, 4] and len(loader) == 3
    assert [k for b in batches for k in b["key"]] == [str(i) for i in sprites_val_keys(sprites)]
    assert [k for b in loader for k in b["key"]] == [k for b in batches for k in b["key"]]  # re-iterable


def sprites_val_keys(manifest: Manifest) -> list[int]:
    import webdataset as wds

    urls = [str(manifest.root / i.name) for i in manifest.shards("val")]
    return [int(s["__key__"]) for s in wds.WebDataset(urls, shardshuffle=False)]


def test_epoch_batches(sprites):
    assert epoch_batches(sprites, "train", 16, 2) == 6
    assert epoch_batches(sprites, "train", 16, 2, max_samples=40) == 1
    assert epoch_batches(sprites, "val", 100, 4) == 1


def test_split_slices_composes_strides():
    slices = [ShardSlice("a"), ShardSlice("b")]
    parts = [split_slices(split_slices(slices, r, 2), w, 3) for r in range(2) for w in range(3)]
    kept = [{(s.url, p) for s in part for p in range(60) if s.keeps(p)} for part in parts]
    union = set().union(*kept)
    assert len(union) == 120 and sum(len(k) for k in kept) == 120  # a partition of all samples
    sized = [ShardSlice("a", shard_samples=20), ShardSlice("b", limit=7, shard_samples=20)]
    counts = [sum(s.num_samples for s in split_slices(sized, w, 3)) for w in range(3)]
    assert counts == [7 + 3, 7 + 2, 6 + 2]


# ---- corrupt data ---------------------------------------------------------------------------------------
def _corrupt_dataset(root: Path) -> Manifest:
    """Two train shards: one with an undecodable png (key 'bad'), one truncated mid-sample."""
    good = [toy_sample(i) for i in range(6)]
    bad = dict(toy_sample(99), __key__="bad", png=b"\x89PNG not really")
    s0 = write_shard(root / "train-000000.tar", good[:3] + [bad])
    s1 = write_shard(root / "train-000001.tar", good[3:])
    tar = root / "train-000001.tar"
    with tarfile.open(tar) as t:
        cut = t.getmember("4.png").offset_data + 10
    tar.write_bytes(tar.read_bytes()[:cut])  # cut inside the last file of the second sample
    manifest = Manifest(dataset="toy", channels=1, image_size=8, image_format="png",
                        factors=[make_factor("a", "continuous", [0, 1]), make_factor("b", "categorical", [0, 1, 2])],
                        default_factor="b", num_samples=7, seed=0,
                        splits={"train": {"num_samples": 7, "shards": [s0, s1]}})
    write_manifest(root, manifest)
    return load_manifest(root)


def test_corrupt_raise_names_shard_and_key(tmp_path):
    manifest = _corrupt_dataset(tmp_path)
    cfg = DataConfig(dataset="dsprites", root=str(tmp_path), shuffle_buffer=0, image_size=8, loader_workers=1)
    with pytest.raises(RuntimeFault) as err:
        list(make_eval_loader(cfg, manifest, "train", batch_size=2))
    assert "train-000000.tar" in str(err.value) and "sample bad" in str(err.value)
    only_truncated = [ShardSlice(str(tmp_path / "train-000001.tar"))]
    loader = make_eval_loader(cfg, manifest, "train", batch_size=2)
    loader.slices = only_truncated
    with pytest.raises(RuntimeFault, match=r"train-000001.tar: corrupt tar after sample 4 "):
        list(loader)
    with pytest.raises(RuntimeFault) as err:  # through a DataLoader worker process: still one line
        list(make_train_loader(cfg, manifest, rank=0, world_size=1, batch_size=2, seed=0, epoch=0, num_batches=5))
    assert "\n" not in str(err.value) and "train-00000" in str(err.value)


def test_corrupt_skip_counts(tmp_path):
    manifest = _corrupt_dataset(tmp_path)
    cfg = DataConfig(dataset="dsprites", root=str(tmp_path), shuffle_buffer=0, image_size=8, on_error="skip")
    loader = make_eval_loader(cfg, manifest, "train", batch_size=2)
    keys = keys_of(loader)
    assert keys == ["0", "1", "2", "3"]  # the bad png is dropped; the truncated shard loses sample 4 on
    assert loader.skipped.count == 2  # the bad png and the truncated tail
    assert any("sample bad" in r for r in loader.skipped.reasons)
    train = make_train_loader(cfg, manifest, rank=0, world_size=1, batch_size=2, seed=0, epoch=0,
                              num_batches=6, on_error="skip")
    assert len(list(train)) == 6 and train.skipped.count >= 2
