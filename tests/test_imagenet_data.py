"""ImageNet converter (fabricated trees in the three validation layouts, a corrupt JPEG each),
class order and label granularities (against the imagenet-x package's own files)."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds

from fabricate_imagenet import devkit_order, fabricate_imagenet, jpeg_bytes, write_devkit
from trainer.config import DataConfig
from trainer.data.convert.imagenet import convert_imagenet, detect_layout, read_devkit_val_labels, verify_image
from trainer.data.imagenet import (
    GRANULARITIES,
    imagenet_label_map,
    imagenet_num_classes,
    imagenetx_annotation_dir,
    standard_classes,
)
from trainer.data.shards import load_manifest, verify_shards
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(300)


def read_split(root: Path, split: str) -> dict[str, tuple[int, bytes]]:
    """key -> (cls, jpg bytes) of every sample in a split's shards (real webdataset reader)."""
    manifest = load_manifest(root)
    urls = [str(root / info.name) for info in manifest.shards(split)]
    out = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in out
        out[sample["__key__"]] = (int(sample["cls"]), sample["jpg"])
    return out


def source_bytes(fab, key: str) -> bytes:
    data_root = fab.root / "ILSVRC" / "Data" / "CLS-LOC" if fab.layout == "kaggle" else fab.root
    return next(data_root.rglob(f"{key}.JPEG")).read_bytes()


@pytest.mark.parametrize("layout", ["folders", "devkit", "kaggle"])
def test_convert_layouts(tmp_path, layout):
    fab = fabricate_imagenet(tmp_path / "src", layout=layout, num_classes=3, train_per_class=3, val_per_class=4)
    out = tmp_path / "shards"
    manifest = convert_imagenet(fab.root, out, samples_per_shard=4, processes=1, progress=False)

    train, val = read_split(out, "train"), read_split(out, "val")
    # Keys are file stems; classes are the real standard indices (val: the real ImageNet labels).
    assert set(val) == set(fab.val_labels) - {Path(p).stem for p in fab.corrupt}
    assert {k: c for k, (c, _) in val.items()} == {k: fab.val_labels[k] for k in val}
    assert {k: c for k, (c, _) in train.items()} == {k: fab.train_labels[k] for k in train}
    assert len(train) == len(fab.train_labels) - 1
    # JPEG bytes copied unchanged.
    for key, (_, data) in list(train.items()) + list(val.items()):
        assert data == source_bytes(fab, key)
    # Val shards are in file-name order (the probe reads them in order).
    assert list(val) == sorted(val)
    # Corrupt files: skipped, named, with a reason, counted.
    assert manifest.skipped == sorted(fab.corrupt)
    assert set(manifest.extra["skipped_reasons"]) == set(fab.corrupt)
    assert all(reason for reason in manifest.extra["skipped_reasons"].values())
    assert manifest.num_samples == len(train) + len(val)
    assert manifest.splits["val"]["num_samples"] == len(val)
    assert manifest.extra["val_labels"] == layout
    assert manifest.extra["wnids"] == list(standard_classes()[0])
    assert manifest.dataset == "imagenet" and manifest.image_format == "jpg" and manifest.factors == []
    verify_shards(out, load_manifest(out))  # sha256 of every shard matches the manifest


def test_convert_parallel_resume_and_report(tmp_path, capfd):
    fab = fabricate_imagenet(tmp_path / "src", layout="folders", num_classes=2, train_per_class=4, val_per_class=3)
    out = tmp_path / "shards"
    first = convert_imagenet(fab.root, out, samples_per_shard=2, processes=2, progress=True)
    err = capfd.readouterr().err
    assert f"skipped {len(fab.corrupt)} corrupt or unreadable image(s)" in err
    for name in fab.corrupt:
        assert name in err
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    second = convert_imagenet(fab.root, out, samples_per_shard=2, processes=2, progress=True)
    assert "resuming" in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes  # nothing rewritten
    assert second.to_dict() == first.to_dict()
    assert set(read_split(out, "val")) == set(fab.val_labels) - {Path(p).stem for p in fab.corrupt}


def test_devkit_ids_follow_meta_mat_not_sorted_wnids(tmp_path):
    fab = fabricate_imagenet(tmp_path / "src", layout="devkit", num_classes=2, val_per_class=2, corrupt=False)
    data = fab.root / "ILSVRC2012_devkit_t12" / "data"
    labels = read_devkit_val_labels(data / "ILSVRC2012_validation_ground_truth.txt", data / "meta.mat")
    real = pd.read_csv(imagenetx_annotation_dir() / "filename_label.csv")
    wnids = standard_classes()[0]
    expected = {Path(n).stem: wnids[c] for n, c in zip(real.file_name, real.label)}
    assert len(labels) == 50000 and labels == expected
    order = devkit_order()
    assert order != sorted(order)  # the fabricated devkit order really differs from the standard one


def test_classes_from_train_numbers_the_folders(tmp_path):
    fab = fabricate_imagenet(tmp_path / "src", num_classes=3, train_per_class=2, val_per_class=2, corrupt=False)
    manifest = convert_imagenet(fab.root, tmp_path / "out", processes=1, progress=False, classes_from="train")
    assert manifest.extra["wnids"] == fab.wnids
    assert manifest.extra["granularities"] == ["1000"]
    val = read_split(tmp_path / "out", "val")
    std = standard_classes()[0]
    assert {k: c for k, (c, _) in val.items()} == {k: fab.wnids.index(std[c]) for k, c in fab.val_labels.items()}


def test_bad_sources_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        detect_layout(tmp_path / "missing")
    (tmp_path / "a" / "val").mkdir(parents=True)
    with pytest.raises(UserError, match="no train/ folder"):
        detect_layout(tmp_path / "a")
    fab = fabricate_imagenet(tmp_path / "b", layout="devkit", num_classes=1, val_per_class=2, corrupt=False)
    data = fab.root / "ILSVRC2012_devkit_t12" / "data"
    (data / "meta.mat").unlink()
    with pytest.raises(UserError, match="missing meta.mat"):
        detect_layout(fab.root)
    elsewhere = tmp_path / "devkit-elsewhere"
    write_devkit(elsewhere)  # the devkit unpacked somewhere else: found through labels_dir
    layout = detect_layout(fab.root, labels_dir=elsewhere)
    assert layout.val_labels == "devkit" and layout.meta_file.is_relative_to(elsewhere)
    fab = fabricate_imagenet(tmp_path / "c", num_classes=1, val_per_class=1, corrupt=False)
    (fab.root / "train" / "n99999999").mkdir()
    with pytest.raises(UserError, match="not ImageNet-1k classes.*n99999999") as err:
        convert_imagenet(fab.root, tmp_path / "out", processes=1, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="classes_from"):
        convert_imagenet(fab.root, tmp_path / "out", processes=1, progress=False, classes_from="sorted")


def test_flat_val_image_without_label_is_named(tmp_path):
    fab = fabricate_imagenet(tmp_path / "src", layout="kaggle", num_classes=1, val_per_class=2, corrupt=False)
    stray = fab.root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00049999.JPEG"
    stray.write_bytes(jpeg_bytes(np.random.default_rng(0)))
    with pytest.raises(UserError, match="ILSVRC2012_val_00049999.JPEG: no label"):
        convert_imagenet(fab.root, tmp_path / "out", processes=1, progress=False)


def test_verify_image():
    rng = np.random.default_rng(0)
    good = jpeg_bytes(rng, (32, 24))
    assert verify_image(good) is None
    assert "truncated" in verify_image(good[: len(good) // 2])
    reason = verify_image(b"GIF89a nonsense")
    assert reason and "0x" not in reason  # no object addresses: reports are reproducible


# ---- class order and granularities ---------------------------------------------------------------
def test_standard_class_order():
    wnids, names = standard_classes()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    assert list(wnids) == sorted(wnids) and names[0] == "tench"


def test_granularity_maps():
    identity = imagenet_label_map("1000")
    assert identity.dtype == torch.long and torch.equal(identity, torch.arange(1000))
    binary = imagenet_label_map("binary")
    assert binary[:500].eq(0).all() and binary[500:].eq(1).all()
    meta = imagenet_label_map("100")
    table = pd.read_csv(imagenetx_annotation_dir() / "imagenet_1k_classes_to_100_metaclasses.csv")
    assert meta.shape == (1000,) and meta.tolist() == table["metaclass"].tolist()
    assert meta.unique().numel() == 100 and set(meta.tolist()) == set(range(100))  # every class mapped
    # Classes 0-6 (tench ... stingray) are fish, class 7 (cock) is a bird.
    assert len(set(meta[:7].tolist())) == 1 and meta[7] != meta[0]
    assert table.loc[0, "name"] == "fish" and table.loc[7, "name"] == "bird"
    assert [imagenet_num_classes(g) for g in GRANULARITIES] == [1000, 100, 2]
    for g in GRANULARITIES:
        assert int(imagenet_label_map(g).max()) + 1 == imagenet_num_classes(g)


def test_granularities_cover_the_config_choices():
    choices = typing.get_args(DataConfig.model_fields["granularity"].annotation)
    assert set(choices) == set(GRANULARITIES)
    with pytest.raises(UserError, match="granularity '10'"):
        imagenet_label_map("10")


def test_imagenet_label_scheme_on_converted_shards(tmp_path):
    from trainer.config import load_config
    from trainer.data.labels import create_label_scheme
    from trainer.data.stream import make_eval_loader

    fab = fabricate_imagenet(tmp_path / "src", num_classes=3, train_per_class=1, val_per_class=3, corrupt=False)
    out = tmp_path / "shards"
    convert_imagenet(fab.root, out, processes=1, progress=False)
    manifest = load_manifest(out)
    batch = next(iter(make_eval_loader(DataConfig(dataset="imagenet", root=str(out), labels="imagenet",
                                                  image_size=16), manifest, "val", batch_size=64)))
    assert batch["image"].shape == (9, 3, 16, 16) and batch["factors"].shape == (9, 0)
    truth = torch.tensor([fab.val_labels[k] for k in batch["key"]])
    for granularity, expected in [("1000", truth), ("binary", (truth >= 500).long()),
                                  ("100", imagenet_label_map("100")[truth])]:
        cfg = load_config("synthetic-supervised", ["data.dataset=imagenet", "data.labels=imagenet",
                                                   f"data.root={out}"])
        # Set on the model: the override `data.granularity=1000` is parsed as a number (see report).
        cfg.data.granularity = granularity
        scheme = create_label_scheme(cfg.data, manifest)
        assert scheme.num_classes == imagenet_num_classes(granularity)
        assert torch.equal(scheme(batch), expected)
    assert len(set(truth.tolist())) == 3 and set((truth >= 500).tolist()) == {False, True}
    bad = {**batch, "cls": torch.full_like(batch["cls"], 1000)}
    with pytest.raises(Exception, match="outside 0..999"):
        scheme(bad)


def test_custom_class_order_allows_only_granularity_1000(tmp_path):
    from trainer.data.labels import create_label_scheme

    fab = fabricate_imagenet(tmp_path / "src", num_classes=2, train_per_class=1, val_per_class=1, corrupt=False)
    convert_imagenet(fab.root, tmp_path / "out", processes=1, progress=False, classes_from="train")
    manifest = load_manifest(tmp_path / "out")
    data = DataConfig(dataset="imagenet", root=str(tmp_path / "out"), labels="imagenet")
    assert create_label_scheme(data, manifest).num_classes == 2
    with pytest.raises(UserError, match="granularity=binary needs the standard ImageNet class order"):
        create_label_scheme(data.model_copy(update={"granularity": "binary"}), manifest)
