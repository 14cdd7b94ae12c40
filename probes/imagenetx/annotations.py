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


def load_imagenetx_annotations(which_factor: str = "multi", filter_prototypes: bool = False) -> pd.DataFrame:
    """The ImageNet-X validation annotations: one row per image.

    Columns: ``key`` (file stem, e.g. ILSVRC2012_val_00004487), ``class`` (standard index), the 16
    factors (0/1) and ``class_binary`` (class >= 500). ``which_factor="multi"`` keeps every factor
    an annotator marked (48,868 images, the paper's "~49k"); ``"top"`` only the top factor.
    ``filter_prototypes`` drops the images used as prototypes during annotation."""
    if which_factor not in ("multi", "top"):
        raise UserError(f"ImageNet-X annotations: which_factor='{which_factor}', choose multi or top")
    from imagenet_x import load_annotations  # heavy (pandas, scipy, tqdm): only when probing

    table = load_annotations(which_factor=which_factor, partition="val", filter_prototypes=filter_prototypes)
    out = pd.DataFrame({"key": table["file_name"].map(lambda name: Path(name).stem)})
    out["class"] = table["class"].to_numpy().astype(np.int64)
    for factor in FACTORS:
        out[factor] = table[factor].to_numpy().astype(np.int64)
    out[CLASS_TARGET] = (out["class"] >= 500).astype(np.int64)
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
