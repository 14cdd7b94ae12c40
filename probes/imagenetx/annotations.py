"""ImageNet-X annotations (shipped in the ``imagenet-x`` package) and their join with features by file name."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from trainer.errors import UserError

FACTORS = ("pose", "background", "pattern", "color", "smaller", "shape", "partial_view", "subcategory",
           "texture", "larger", "darker", "object_blocking", "person_blocking", "style", "brighter",
           "multiple_objects")  # the order of imagenet_x.FACTORS
CLASS_TARGET = "class_binary"
TARGETS = FACTORS + (CLASS_TARGET,)


# The public code (klindtlab/csi, imagenetx/get_activations.py) calls imagenet_x.load_annotations()
# with the package's defaults: the top factor per image, the annotators' prototype images removed.
DEFAULT_WHICH_FACTOR = "top"
DEFAULT_FILTER_PROTOTYPES = True
CLASS_SPLITS = ("mean", "500")


def load_imagenetx_annotations(which_factor: str = DEFAULT_WHICH_FACTOR,
                               filter_prototypes: bool = DEFAULT_FILTER_PROTOTYPES,
                               class_split: str = "mean") -> pd.DataFrame:
    """The ImageNet-X validation annotations: one row per image.

    Columns: ``key`` (file stem, e.g. ILSVRC2012_val_00004487), ``class`` (standard index), the 16
    factors (0/1) and ``class_binary``. The defaults are imagenet_x.load_annotations()'s, as the
    public code uses them: ``which_factor="top"`` marks only the annotators' top factor (one 1 per
    image) and ``filter_prototypes`` drops the images shown to annotators as prototypes (46,110 remain);
    ``"multi"`` keeps every marked factor (48,868 images with the prototypes, the paper's "~49k").
    ``class_split="mean"``: class_binary = class > the mean class of these annotations (the public
    decode.py; 497.7 for the defaults, i.e. class >= 498); ``"500"``: class >= 500."""
    if which_factor not in ("multi", "top"):
        raise UserError(f"ImageNet-X annotations: which_factor='{which_factor}', choose multi or top")
    if class_split not in CLASS_SPLITS:
        raise UserError(f"ImageNet-X annotations: class_split='{class_split}', choose {' or '.join(CLASS_SPLITS)}")
    from imagenet_x import load_annotations  # heavy (pandas, scipy, tqdm): only when probing

    table = load_annotations(which_factor=which_factor, partition="val", filter_prototypes=filter_prototypes)
    out = pd.DataFrame({"key": table["file_name"].map(lambda name: Path(name).stem)})
    out["class"] = table["class"].to_numpy().astype(np.int64)
    for factor in FACTORS:
        out[factor] = table[factor].to_numpy().astype(np.int64)
    above = out["class"] > out["class"].mean() if class_split == "mean" else out["class"] >= 500
    out[CLASS_TARGET] = above.astype(np.int64)
    return out.reset_index(drop=True)


def join_features(keys: Sequence[str], features: np.ndarray | Tensor,
                  annotations: pd.DataFrame | None = None) -> tuple[np.ndarray, pd.DataFrame, int]:
    """Keep the feature rows whose key is annotated, in key order.

    keys: the shards' ``__key__`` per feature row (file stems; a ``.JPEG`` suffix is ignored).
    Returns (X [found, p] float32, Y [found rows, targets] with a ``key`` column, found)."""
    annotations = load_imagenetx_annotations() if annotations is None else annotations
    stems = [Path(k).stem if k.lower().endswith((".jpeg", ".jpg")) else k for k in keys]
    if len(stems) != len(features):
        raise UserError(f"ImageNet-X join: {len(stems)} keys but {len(features)} feature rows")
    duplicated = pd.Index(stems)[pd.Index(stems).duplicated()]
    if len(duplicated):
        raise UserError(f"ImageNet-X join: key '{duplicated[0]}' occurs {stems.count(duplicated[0])} times "
                        "(the validation shards must hold each image once)")
    by_key = annotations.set_index("key")
    found_mask = np.fromiter((k in by_key.index for k in stems), dtype=bool, count=len(stems))
    rows = np.flatnonzero(found_mask)
    X = torch.as_tensor(features).detach().cpu().numpy()[rows].astype(np.float32, copy=False)
    Y = by_key.loc[[stems[i] for i in rows], list(TARGETS)].reset_index()
    return X, Y, int(len(rows))
