"""Fabricate a tiny ImageNet folder tree in the real layouts, with real ImageNet-X file names.

The validation images are named like real ones that ImageNet-X annotates (taken from the
imagenet-x package) and carry their real classes, so a converted tree joins with the real
annotations. Images are tiny random JPEGs (seeded). Layouts of the validation labels:

* ``folders``: ``val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG``
* ``devkit``:  flat ``val/`` + ``ILSVRC2012_devkit_t12/data/{ILSVRC2012_validation_ground_truth.txt,
  meta.mat}`` with ILSVRC2012_IDs in a shuffled (devkit-like, not sorted) order
* ``kaggle``:  ``ILSVRC/Data/CLS-LOC/{train,val}`` + ``LOC_val_solution.csv``
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from trainer.data.imagenet import imagenetx_annotation_dir, standard_classes


def jpeg_bytes(rng: np.random.Generator, size: tuple[int, int] = (20, 16)) -> bytes:
    """A small random RGB JPEG."""
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def corrupt_jpeg_bytes(rng: np.random.Generator) -> bytes:
    """A JPEG cut in the middle of its scan data: headers parse, decoding fails."""
    data = jpeg_bytes(rng, (64, 64))
    return data[: len(data) // 2]


@dataclass
class FabricatedImageNet:
    """What a test needs to check a conversion of the fabricated tree."""

    root: Path
    wnids: list[str]  # classes present (train folders), sorted
    val_labels: dict[str, int] = field(default_factory=dict)  # val stem -> standard class index
    train_labels: dict[str, int] = field(default_factory=dict)  # train stem -> standard class index
    corrupt: list[str] = field(default_factory=list)  # relative paths of the corrupt files
    layout: str = "folders"

    @property
    def good_keys(self) -> set[str]:
        bad = {Path(p).stem for p in self.corrupt}
        return (set(self.val_labels) | set(self.train_labels)) - bad


@functools.lru_cache(maxsize=1)
def _real_val_table() -> pd.DataFrame:
    """The package's (file_name, label) table of the 50,000 validation images (read once)."""
    return pd.read_csv(imagenetx_annotation_dir() / "filename_label.csv")


@functools.lru_cache(maxsize=1)
def _annotated_names() -> frozenset[str]:
    path = imagenetx_annotation_dir() / "imagenet_x_val_multi_factor.jsonl"
    with open(path) as fh:
        return frozenset(json.loads(line)["file_name"] for line in fh if line.strip())


def real_val_names(num_classes: int = 3, per_class: int = 4) -> dict[str, int]:
    """Real ImageNet-X validation stems -> their real standard class: `per_class` images from each
    of `num_classes` annotated classes spread over 0..999 (both halves for the binary class)."""
    table = _real_val_table()
    table = table[table.file_name.isin(_annotated_names())]
    chosen = {}
    classes = np.sort(table.label.unique())
    for cls in classes[np.linspace(0, len(classes) - 1, num_classes).round().astype(int)]:
        for name in sorted(table[table.label == cls].file_name)[:per_class]:
            chosen[Path(name).stem] = int(cls)
    return chosen


def fabricate_imagenet(root: Path, *, layout: str = "folders", num_classes: int = 3, train_per_class: int = 3,
                       val_per_class: int = 4, corrupt: bool = True, seed: int = 0) -> FabricatedImageNet:
    """Write the tree under root; one corrupt train JPEG (and one corrupt val JPEG) if `corrupt`."""
    rng = np.random.default_rng(seed)
    wnids_all, _ = standard_classes()
    val = real_val_names(num_classes, val_per_class)
    classes = sorted(set(val.values()))
    data_root = root / "ILSVRC" / "Data" / "CLS-LOC" if layout == "kaggle" else root
    fab = FabricatedImageNet(root=root, wnids=[wnids_all[c] for c in classes], val_labels=val, layout=layout)
    for cls in classes:
        wnid = wnids_all[cls]
        folder = data_root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(train_per_class):
            stem = f"{wnid}_{1000 + j}"
            (folder / f"{stem}.JPEG").write_bytes(jpeg_bytes(rng))
            fab.train_labels[stem] = cls
    for stem, cls in val.items():
        folder = data_root / "val" / (wnids_all[cls] if layout == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.JPEG").write_bytes(jpeg_bytes(rng))
    if corrupt:
        _corrupt_one(fab, data_root, rng)
    if layout == "devkit":
        write_devkit(root, seed=seed)
    elif layout == "kaggle":
        write_kaggle_solution(root, val)
    elif layout != "folders":
        raise ValueError(f"unknown layout {layout}")
    return fab


def _corrupt_one(fab: FabricatedImageNet, data_root: Path, rng: np.random.Generator) -> None:
    train_victim = sorted(fab.train_labels)[1]
    rel = f"train/{train_victim.split('_')[0]}/{train_victim}.JPEG"
    (data_root / rel).write_bytes(corrupt_jpeg_bytes(rng))
    val_victim = sorted(fab.val_labels)[-1]
    val_rel = next(p for p in (data_root / "val").rglob(f"{val_victim}.JPEG")).relative_to(data_root)
    (data_root / val_rel).write_bytes(b"this is not a JPEG at all")
    fab.corrupt = [rel, str(val_rel)]


def devkit_order(seed: int = 0) -> list[str]:
    """The fabricated devkit's order of the 1000 wnids: ILSVRC2012_ID i+1 = order[i] (not sorted)."""
    wnids, _ = standard_classes()
    return [wnids[i] for i in np.random.default_rng(seed + 1).permutation(len(wnids))]


def write_devkit(root: Path, seed: int = 0) -> Path:
    """ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt} for all 50,000
    validation images (real labels), IDs in a shuffled order, plus two non-leaf synsets."""
    import scipy.io

    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True, exist_ok=True)
    order = devkit_order(seed)
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((len(order) + 2,), dtype=dtype)
    for i, wnid in enumerate(order):
        synsets[i] = (i + 1, wnid, wnid, 0)
    synsets[-2] = (1001, "n00001740", "entity", 2)  # non-leaf entries exist in the real file too
    synsets[-1] = (1002, "n00021939", "artifact", 5)
    scipy.io.savemat(str(data / "meta.mat"), {"synsets": synsets[:, None]})
    id_of_class = {wnid: i + 1 for i, wnid in enumerate(order)}
    wnids, _ = standard_classes()
    table = _real_val_table()
    number = table.file_name.str.extract(r"_(\d{8})\.")[0].astype(int)
    ids = np.zeros(50000, dtype=np.int64)
    ids[number.to_numpy() - 1] = [id_of_class[wnids[c]] for c in table.label]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    return data


def write_kaggle_solution(root: Path, val: dict[str, int]) -> Path:
    """LOC_val_solution.csv: ImageId,PredictionString ('wnid xmin ymin xmax ymax' repeated)."""
    wnids, _ = standard_classes()
    lines = ["ImageId,PredictionString"]
    for stem, cls in sorted(val.items()):
        lines.append(f"{stem},{wnids[cls]} 10 12 200 180 {wnids[cls]} 5 5 50 60 ")
    path = root / "LOC_val_solution.csv"
    path.write_text("\n".join(lines) + "\n")
    return path
