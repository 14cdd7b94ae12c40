"""Label schemes over real shards: shared properties for every registered scheme, then each
scheme's meaning (factor classes, seeded Voronoi partitions, DIET instance ids)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import DataConfig
from trainer.data.convert import dsprites as ds
from trainer.data.labels import (LABEL_SCHEMES, FactorLabels, LabelScheme, PartitionLabels, create_label_scheme,
                                 register_label_scheme)
from trainer.data.shards import Manifest, load_manifest
from trainer.data.stream import make_eval_loader
from trainer.errors import RuntimeFault, UserError


@pytest.fixture(scope="module")
def sprites(tmp_path_factory) -> Manifest:
    root = tmp_path_factory.mktemp("sprites")
    ds.generate_dsprites(root, seed=0, samples_per_shard=100, processes=1, limit=300, progress=False)
    return load_manifest(root)


@pytest.fixture(scope="module")
def batch(sprites) -> dict:
    cfg = DataConfig(dataset="dsprites", root=str(sprites.root))
    return next(iter(make_eval_loader(cfg, sprites, "train", batch_size=200)))


def cfg(labels: str, **kw) -> DataConfig:
    return DataConfig(dataset="dsprites", root="/unused", labels=labels, **kw)


def grid_batch(n: int, seed: int = 0) -> dict:
    """Factor values of n random dSprites grid points, as a loader batch would carry them."""
    index = np.random.default_rng(seed).choice(ds.NUM_IMAGES, n, replace=False)
    return {"factors": torch.from_numpy(ds.grid_values(index)), "index": torch.from_numpy(index),
            "key": [str(i) for i in index]}


@pytest.mark.parametrize("name", sorted(LABEL_SCHEMES))
def test_every_scheme_gives_valid_deterministic_targets(name, sprites, batch):
    scheme = create_label_scheme(cfg(name, num_classes=7), sprites, seed=3)
    labels = scheme(batch)
    assert labels.dtype == torch.int64 and labels.shape == (200,)
    assert 0 <= int(labels.min()) and int(labels.max()) < scheme.num_classes
    assert torch.equal(labels, scheme(batch))
    again = create_label_scheme(cfg(name, num_classes=7), sprites, seed=3)
    assert again.num_classes == scheme.num_classes and torch.equal(again(batch), labels)
    assert len(labels.unique()) > 1


def test_factor_scheme_is_the_default_class(sprites, batch):
    scheme = create_label_scheme(cfg("factor"), sprites)
    assert isinstance(scheme, FactorLabels) and scheme.factor_name == "shape" and scheme.num_classes == 3
    assert torch.equal(scheme(batch), batch["cls"])
    assert isinstance(create_label_scheme(cfg("class"), sprites), FactorLabels)  # alias
    color = create_label_scheme(cfg("factor", factor="color"), sprites)
    assert color.num_classes == 1 and int(color(batch).max()) == 0
    with pytest.raises(UserError, match="data.factor=scale is continuous"):
        create_label_scheme(cfg("factor", factor="scale"), sprites)
    with pytest.raises(UserError, match="no factor 'size'"):
        create_label_scheme(cfg("factor", factor="size"), sprites)


@pytest.mark.parametrize("k", [2, 50, 5000])
def test_partition_any_number_of_classes(sprites, k):
    scheme = create_label_scheme(cfg("partition", num_classes=k), sprites, seed=1)
    assert isinstance(scheme, PartitionLabels) and scheme.num_classes == k
    assert scheme.centres.shape == (k, 4 + 2)  # shape, scale, posX, posY + cos/sin(orientation)
    labels = scheme(grid_batch(4000))
    assert int(labels.max()) < k
    assert len(labels.unique()) >= min(k, 4000) * 0.5  # cells are used, not a degenerate few


def test_partition_geometry(sprites):
    scheme = create_label_scheme(cfg("partition", num_classes=20), sprites, seed=1)
    points = torch.from_numpy(PartitionLabels._grid_points(sprites.factors, 20, 1))
    assert torch.equal(scheme({"factors": points}), torch.arange(20))  # every centre lies in its own cell
    turned = points.clone()
    turned[:, 3] = (turned[:, 3] + 2 * np.pi)  # orientation is periodic: a full turn changes nothing
    assert torch.equal(scheme({"factors": turned}), torch.arange(20))
    other = create_label_scheme(cfg("partition", num_classes=20), sprites, seed=2)
    assert not torch.equal(other.centres, scheme.centres)
    with pytest.raises(UserError, match="exceeds the 737280 points"):
        create_label_scheme(cfg("partition", num_classes=800_000), sprites)


def test_instance_scheme(sprites, batch):
    scheme = create_label_scheme(cfg("instance"), sprites)
    assert scheme.num_classes == 300  # a subset: its keys are listed in the manifest
    keys = sorted(sprites.extra["keys"])
    labels = scheme(batch)
    assert [keys[i] for i in labels.tolist()] == batch["index"].tolist()
    assert len(labels.unique()) == 200
    outsider = next(i for i in range(ds.NUM_IMAGES) if i not in set(keys))
    with pytest.raises(RuntimeFault, match=f"sample key '{outsider}'"):
        scheme({"index": torch.tensor([outsider]), "key": [str(outsider)]})
    dense = Manifest(**{**sprites.__dict__, "extra": {}, "num_samples": 1000})
    dense_scheme = create_label_scheme(cfg("instance"), dense)
    assert dense_scheme.num_classes == 1000
    assert torch.equal(dense_scheme({"index": torch.tensor([0, 999]), "key": ["0", "999"]}), torch.tensor([0, 999]))
    with pytest.raises(RuntimeFault, match="'1000'"):
        dense_scheme({"index": torch.tensor([1000]), "key": ["1000"]})


def test_registry_hooks(sprites, batch):
    @register_label_scheme("parity")
    class Parity(LabelScheme):
        num_classes = 2

        def __call__(self, b: dict) -> torch.Tensor:
            return b["index"] % 2

    try:
        data = cfg("factor").model_copy(update={"labels": "parity"})
        assert torch.equal(create_label_scheme(data, sprites)(batch), batch["index"] % 2)
    finally:
        LABEL_SCHEMES.pop("parity")
    with pytest.raises(UserError, match="unknown label scheme"):
        create_label_scheme(cfg("factor").model_copy(update={"labels": "nope"}), sprites)
    if "imagenet" not in LABEL_SCHEMES:
        try:
            import trainer.data.imagenet  # noqa: F401
        except ImportError:
            with pytest.raises(UserError, match="trainer.data.imagenet is not available"):
                create_label_scheme(cfg("imagenet"), sprites)
