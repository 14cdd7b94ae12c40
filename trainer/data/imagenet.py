"""ImageNet-1k at training and probe time: the class order, label granularities, eval transform.

The converter that writes ImageNet shards (folder layouts, devkit / Kaggle validation labels,
image checks) is ``trainer.data.convert.imagenet``; this module is what reads them back.

Class order: shards written with ``classes_from="standard"`` use the standard 1000-class order
(sorted wnids n01440764 ... n15075141, as shipped in the ``imagenet-x`` package);
``classes_from="train"`` numbers the classes found under ``train/`` in sorted order (for subsets
and fabricated trees: granularities ``100`` and ``binary`` then do not apply).

Label granularities (``data.granularity``): ``1000`` (identity), ``100`` (the imagenet-x
metaclasses), ``binary`` (class >= 500). ``ImagenetLabels`` registers itself as the label
scheme ``imagenet`` when this module is imported (``trainer.data.labels`` imports it on first use).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.data.labels import LabelScheme, register_label_scheme
from trainer.data.shards import Manifest
from trainer.errors import RuntimeFault, UserError

NUM_CLASSES = 1000
GRANULARITIES = ("1000", "100", "binary")


# ---- what the imagenet-x package ships ------------------------------------------------------
def imagenetx_annotation_dir() -> Path:
    """Folder of the imagenet-x package's annotation files (found without importing it)."""
    spec = importlib.util.find_spec("imagenet_x")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the imagenet-x package is not installed (pip install imagenet-x==0.0.7)")
    return Path(next(iter(spec.submodule_search_locations))) / "annotations"


@functools.lru_cache(maxsize=1)
def standard_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, names) of the 1000 classes in the standard order (index = class id)."""
    path = imagenetx_annotation_dir() / "imagenet_labels.txt"
    wnids, names = [], []
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            wnids.append(row[0])
            names.append(row[1] if len(row) > 1 else row[0])
    if len(wnids) != NUM_CLASSES or wnids != sorted(wnids):
        raise UserError(f"{path}: expected the 1000 sorted ImageNet wnids, got {len(wnids)}")
    return tuple(wnids), tuple(names)


@functools.lru_cache(maxsize=1)
def metaclass_of_class() -> np.ndarray:
    """int64 [1000]: the imagenet-x metaclass (0..99) of each standard class index."""
    path = imagenetx_annotation_dir() / "imagenet_1k_classes_to_100_metaclasses.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))  # row i = class i: wnid/name of its metaclass, metaclass id
    labels = np.array([int(r["metaclass"]) for r in rows], dtype=np.int64)
    if len(labels) != NUM_CLASSES or set(labels.tolist()) != set(range(100)):
        raise UserError(f"{path}: expected 1000 rows mapping onto metaclasses 0..99")
    return labels


# ---- label granularities --------------------------------------------------------------------
def _check_granularity(granularity: str) -> str:
    granularity = str(granularity)
    if granularity not in GRANULARITIES:
        raise UserError(f"ImageNet label granularity '{granularity}': choose one of {', '.join(GRANULARITIES)}")
    return granularity


def imagenet_label_map(granularity: str) -> torch.Tensor:
    """LongTensor [1000]: standard class index -> training label at this granularity."""
    granularity = _check_granularity(granularity)
    classes = torch.arange(NUM_CLASSES)
    if granularity == "1000":
        return classes
    if granularity == "binary":
        return (classes >= NUM_CLASSES // 2).long()
    return torch.from_numpy(metaclass_of_class().copy())


def imagenet_num_classes(granularity: str) -> int:
    """Head rows needed at this granularity: 1000, 100 or 2."""
    return {"1000": NUM_CLASSES, "100": 100, "binary": 2}[_check_granularity(granularity)]


@register_label_scheme("imagenet")
class ImagenetLabels(LabelScheme):
    """data.labels=imagenet: the shards' class index mapped to data.granularity (1000 | 100 | binary)."""

    def __init__(self, data: DataConfig, manifest: Manifest, seed: int = 0):
        super().__init__(data, manifest, seed)
        granularity = _check_granularity(data.granularity)
        order = manifest.extra.get("class_order", "standard")
        if order == "standard":
            self.label_map = imagenet_label_map(granularity)
            self.num_classes = imagenet_num_classes(granularity)
        elif granularity == "1000":  # a custom class set (classes_from=train): its own indices
            self.num_classes = len(manifest.extra.get("wnids") or []) or NUM_CLASSES
            self.label_map = torch.arange(self.num_classes)
        else:
            raise UserError(f"data.granularity={granularity} needs the standard ImageNet class order, but "
                            f"{manifest.dataset} shards were written with --classes-from {order}")

    def __call__(self, batch: dict) -> torch.Tensor:
        cls = batch["cls"]
        bad = (cls < 0) | (cls >= len(self.label_map))
        if bool(bad.any()):
            key = batch["key"][int(bad.nonzero()[0, 0])]
            raise RuntimeFault(f"labels=imagenet: sample {key!r} has class {int(cls[bad][0])}, outside "
                               f"0..{len(self.label_map) - 1}")
        return self.label_map.to(cls.device)[cls]


# ---- transforms: timm's factories (resolve_data_config + create_transform) ----------------------
def imagenet_data_config(image_size: int, encoder: str | None = None, pretrained: bool = False) -> dict:
    """timm's data config (input size, interpolation, mean/std, crop_pct) for `image_size`.

    The encoder's own pretrained config (e.g. a ViT's mean/std of 0.5 and crop_pct 0.9) only when
    its pretrained weights are used: a model trained from scratch here has seen timm's defaults
    (ImageNet mean/std, crop_pct 0.875, bicubic), which is also what probes use."""
    from timm.data import resolve_data_config

    pretrained_cfg = None
    if encoder and pretrained:
        import timm

        if timm.is_model(encoder):
            pretrained_cfg = timm.models.get_pretrained_cfg(encoder, allow_unregistered=True)
            pretrained_cfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else None
    return resolve_data_config({"input_size": (3, image_size, image_size)}, pretrained_cfg=pretrained_cfg)


def imagenet_train_transform(data: DataConfig, encoder: str | None = None, pretrained: bool = False):
    """timm's training transform: random resized crop, flip, data.auto_augment (RandAugment),
    normalisation, data.random_erasing -> CHW float tensor."""
    from timm.data import create_transform

    return create_transform(**imagenet_data_config(data.image_size, encoder, pretrained), is_training=True,
                            auto_augment=data.auto_augment, re_prob=data.random_erasing, re_mode="pixel")


def imagenet_fast_train_transform(data: DataConfig, encoder: str | None = None, pretrained: bool = False,
                                  color_jitter: float = 0.4):
    """The same training crop on uint8 (`stream.JpegRandomResizedCrop`: JPEG bytes -> uint8, DCT-scaled
    decoding for large crops, normalised in the training process), or None when the recipe needs
    timm's PIL pipeline: RandAugment (data.auto_augment), random erasing, or an interpolation
    torch's uint8 resize lacks. `color_jitter` 0.4 is timm's default when RandAugment is off."""
    from trainer.data.stream import JpegRandomResizedCrop, fast_interpolations

    config = imagenet_data_config(data.image_size, encoder, pretrained)
    if data.auto_augment or data.random_erasing > 0 or config["interpolation"] not in fast_interpolations():
        return None
    return JpegRandomResizedCrop(data.image_size, config["mean"], config["std"],
                                 interpolation=config["interpolation"], color_jitter=color_jitter)


def imagenet_eval_transform(image_size: int, encoder: str | None = None, pretrained: bool = False):
    """PIL image -> float tensor [3, size, size] by timm's eval transform: resize to size/crop_pct,
    centre crop, normalise (shared by the loader's validation path and the probes)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    timm_eval = create_transform(**imagenet_data_config(image_size, encoder, pretrained), is_training=False)
    return T.Compose([T.Lambda(lambda im: im.convert("RGB")), timm_eval])
