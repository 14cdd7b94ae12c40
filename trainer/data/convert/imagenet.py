"""ImageNet-1k converter: the standard folders -> WebDataset shards + manifest (run once).

``convert_imagenet(SRC, OUT)`` reads the layouts people actually have:

* ``SRC/train/<wnid>/*.JPEG`` (also under the Kaggle root ``SRC/ILSVRC/Data/CLS-LOC/``);
* validation either as ``SRC/val/<wnid>/*.JPEG`` or flat ``SRC/val/ILSVRC2012_val_*.JPEG`` with
  its labels from the devkit (``ILSVRC2012_validation_ground_truth.txt`` + ``meta.mat``, whose
  ILSVRC2012_IDs are in the devkit's own order, not sorted wnids) or from Kaggle's
  ``LOC_val_solution.csv``.

Each sample is ``{"__key__": file stem, "jpg": the file's bytes unchanged, "cls": class index,
"factors.npy": float32[0]}`` (ImageNet has no ground-truth factors; the empty vector keeps the
sample schema of the other datasets).
The key is the file stem so that ImageNet-X annotations (keyed by file name) join by name. Every
image is verified (PIL ``verify`` + a decode); corrupt or unreadable files are skipped, printed
and listed in the manifest (``skipped`` + ``extra["skipped_reasons"]``), never dropped silently.
Shards are written in parallel and resumably by ``trainer.data.convert.shards.build_shards``.

Class order (``classes_from``) and label granularities: see ``trainer.data.imagenet``, which reads
these shards at training and probe time.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from trainer.data.convert.shards import STATE_NAME, SkipSample, build_shards, write_manifest
from trainer.data.imagenet import GRANULARITIES, NUM_CLASSES, standard_classes
from trainer.data.shards import Manifest
from trainer.errors import UserError
from trainer.files import write_text_atomic

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
KAGGLE_VAL_SOLUTION = "LOC_val_solution.csv"
ITEMS_NAME = ".imagenet-items.tsv"
_WNID = re.compile(r"^n\d{8}$")
_NO_FACTORS = np.zeros(0, dtype=np.float32)


# ---- finding the images -----------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One image to convert: its split, path relative to the source root, key and class."""

    split: str
    relpath: str
    key: str
    cls: int


@dataclass
class Layout:
    """Where a source tree keeps its parts (see module docstring)."""

    data_root: Path  # the folder holding train/ and val/
    val_labels: Literal["folders", "devkit", "kaggle"]
    label_file: Path | None = None
    meta_file: Path | None = None


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _find_file(src: Path, name: str) -> Path | None:
    """`name` in the usual places of the devkit / Kaggle layouts, or anywhere two levels down."""
    candidates = [src / name, src / "ILSVRC2012_devkit_t12" / "data" / name, src / "devkit" / "data" / name,
                  src / "data" / name, src / "val" / name]
    candidates += sorted(src.glob(f"*/{name}")) + sorted(src.glob(f"*/*/{name}"))
    return next((p for p in candidates if p.is_file()), None)


def detect_layout(src: Path, labels_dir: Path | None = None) -> Layout:
    """Find train/ and val/ and how validation labels are given; UserError says what is missing.

    labels_dir: another folder holding LOC_val_solution.csv or the devkit files (searched first)."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"ImageNet source {src} is not a directory")
    kaggle_root = src / "ILSVRC" / "Data" / "CLS-LOC"
    data_root = kaggle_root if (kaggle_root / "train").is_dir() else src
    if not (data_root / "train").is_dir():
        raise UserError(f"ImageNet source {src}: no train/ folder (expected train/<wnid>/*.JPEG)")
    if not (data_root / "val").is_dir():
        raise UserError(f"ImageNet source {src}: no val/ folder (val/<wnid>/*.JPEG or flat val/*.JPEG)")
    if any(_WNID.match(d) for d in _subdirs(data_root / "val")):
        return Layout(data_root, "folders")
    bases = ([Path(labels_dir)] if labels_dir else []) + [src]

    def find(name: str) -> Path | None:
        return next((p for p in (_find_file(b, name) for b in bases if b.is_dir()) if p), None)

    kaggle = find(KAGGLE_VAL_SOLUTION)
    if kaggle is not None:
        return Layout(data_root, "kaggle", label_file=kaggle)
    truth, meta = find(DEVKIT_GROUND_TRUTH), find(DEVKIT_META)
    if truth is not None and meta is not None:
        return Layout(data_root, "devkit", label_file=truth, meta_file=meta)
    missing = DEVKIT_META if truth is not None else DEVKIT_GROUND_TRUTH
    raise UserError(f"ImageNet source {src}: val/ is flat but no labels were found: need {KAGGLE_VAL_SOLUTION}, "
                    f"or the devkit's {DEVKIT_GROUND_TRUTH} + {DEVKIT_META} (missing {missing})")


def read_devkit_val_labels(ground_truth: Path, meta: Path) -> dict[str, str]:
    """Devkit: val stem -> wnid. Line i of the ground truth is ILSVRC2012_val_{i:08d}'s
    ILSVRC2012_ID (1-based, devkit order), mapped to a wnid through meta.mat's synsets."""
    import scipy.io

    try:
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise UserError(f"{meta}: not a devkit meta.mat with synsets (ILSVRC2012_ID, WNID): "
                        f"{err.__class__.__name__}") from None
    labels = {}
    with open(ground_truth) as fh:
        for line_no, line in enumerate(fh, start=1):
            text = line.strip()
            if not text:
                continue
            if not text.isdigit() or int(text) not in id_to_wnid:
                raise UserError(f"{ground_truth}:{line_no}: '{text[:20]}' is not an ILSVRC2012_ID listed in {meta}")
            labels[f"ILSVRC2012_val_{line_no:08d}"] = id_to_wnid[int(text)]
    return labels


def read_kaggle_val_labels(solution: Path) -> dict[str, str]:
    """Kaggle: LOC_val_solution.csv (ImageId, PredictionString 'wnid x y x y ...') -> stem -> wnid."""
    labels = {}
    with open(solution, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise UserError(f"{solution}: expected columns ImageId,PredictionString")
        for line_no, row in enumerate(reader, start=2):
            tokens = (row["PredictionString"] or "").split()
            if not tokens or not _WNID.match(tokens[0]):
                raise UserError(f"{solution}:{line_no}: PredictionString does not start with a wnid")
            labels[row["ImageId"].strip()] = tokens[0]
    return labels


def class_order(data_root: Path, classes_from: str) -> tuple[list[str], list[str]]:
    """(wnids, names) defining class indices: the standard 1000, or sorted train/ folders."""
    train_wnids = [d for d in _subdirs(data_root / "train") if _WNID.match(d)]
    if not train_wnids:
        raise UserError(f"{data_root / 'train'}: no <wnid> class folders (like n01440764)")
    if classes_from == "train":
        std_wnids, std_names = standard_classes()
        names = dict(zip(std_wnids, std_names))
        return train_wnids, [names.get(w, w) for w in train_wnids]
    if classes_from != "standard":
        raise UserError(f"classes_from='{classes_from}': choose standard or train")
    wnids, names = standard_classes()
    unknown = sorted(set(train_wnids) - set(wnids))
    if unknown:
        raise UserError(f"{data_root / 'train'}: {len(unknown)} folder(s) are not ImageNet-1k classes "
                        f"(e.g. {unknown[0]}); use --classes-from train for a custom class set")
    if len(train_wnids) < NUM_CLASSES:
        print(f"[imagenet] train/ has {len(train_wnids)} of the {NUM_CLASSES} classes; "
              "standard indices are kept", file=sys.stderr)
    return list(wnids), list(names)


def list_items(layout: Layout, wnids: list[str], *, seed: int) -> dict[str, list[Item]]:
    """Every train and val image with its key and class; train shuffled (seeded), val by name."""
    index = {w: i for i, w in enumerate(wnids)}
    root = layout.data_root
    train = []
    for wnid in _subdirs(root / "train"):
        if wnid not in index:
            continue
        for name in sorted(n for n in os.listdir(root / "train" / wnid) if _is_image(n)):
            train.append(Item("train", f"train/{wnid}/{name}", Path(name).stem, index[wnid]))
    # Shuffled so that every shard (and the first shards, for subsets) mixes all classes.
    order = np.random.default_rng(seed).permutation(len(train))
    train = [train[i] for i in order]
    return {"train": train, "val": _val_items(layout, index)}


def _val_items(layout: Layout, index: dict[str, int]) -> list[Item]:
    val_dir = layout.data_root / "val"
    items = []
    if layout.val_labels == "folders":
        for wnid in _subdirs(val_dir):
            if not _WNID.match(wnid):
                continue
            if wnid not in index:
                raise UserError(f"{val_dir / wnid}: class folder not among the train/ classes")
            for name in sorted(n for n in os.listdir(val_dir / wnid) if _is_image(n)):
                items.append(Item("val", f"val/{wnid}/{name}", Path(name).stem, index[wnid]))
        return sorted(items, key=lambda it: it.key)
    if layout.val_labels == "kaggle":
        labels = read_kaggle_val_labels(layout.label_file)
    else:
        labels = read_devkit_val_labels(layout.label_file, layout.meta_file)
    for name in sorted(n for n in os.listdir(val_dir) if _is_image(n)):
        stem = Path(name).stem
        wnid = labels.get(stem)
        if wnid is None:
            raise UserError(f"{val_dir / name}: no label in {layout.label_file}")
        if wnid not in index:
            raise UserError(f"{val_dir / name}: label {wnid} is not among the train/ classes")
        items.append(Item("val", f"val/{name}", stem, index[wnid]))
    return items


def _check_unique_keys(items: list[Item], split: str) -> None:
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise UserError(f"{split}: two images share the key '{it.key}' ({seen[it.key]}, {it.relpath})")
        seen[it.key] = it.relpath


# ---- one sample (runs in the shard-writing processes) -----------------------------------------
@functools.lru_cache(maxsize=2)
def _load_items(items_file: str) -> tuple[str, list[tuple[str, str, int]]]:
    """(source root, [(relpath, key, cls)]) from the items file (read once per process)."""
    with open(items_file) as fh:
        root = fh.readline().rstrip("\n")
        rows = [line.rstrip("\n").split("\t") for line in fh]
    return root, [(r[1], r[2], int(r[3])) for r in rows]


def verify_image(data: bytes) -> str | None:
    """None if PIL can verify and decode the bytes, else a short reason."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure (headers, markers); cheap
        with Image.open(io.BytesIO(data)) as im:
            # draft: decode the whole entropy-coded stream but IDCT at 1/8 scale (faster, same checks).
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return _reason(err)
    return None


def _reason(err: Exception) -> str:
    """One short, reproducible line (PIL's messages may embed object addresses)."""
    text = re.sub(r"\s*<[^>]*>", "", str(err)).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0][:80] if text else 'unreadable'}"


def make_imagenet_sample(items_file: str, index: int) -> dict:
    """The shard sample of item `index`; SkipSample('relpath\\treason') for an unreadable image."""
    root, items = _load_items(items_file)
    relpath, key, cls = items[index]
    try:
        data = (Path(root) / relpath).read_bytes()
    except OSError as err:
        raise SkipSample(f"{relpath}\t{err.__class__.__name__}: cannot be read") from None
    reason = verify_image(data)
    if reason is not None:
        raise SkipSample(f"{relpath}\t{reason}")
    # An empty factor vector keeps the sample schema uniform (manifest factors = []): ~128 bytes.
    return {"__key__": key, "jpg": data, "cls": cls, "factors.npy": _NO_FACTORS}


# ---- the converter ------------------------------------------------------------------------------
def _write_items(out_dir: Path, data_root: Path, items: list[Item]) -> Path:
    """Write the item list the workers read; a changed list invalidates resumable state."""
    text = str(data_root.resolve()) + "\n" + "".join(
        f"{it.split}\t{it.relpath}\t{it.key}\t{it.cls}\n" for it in items)
    path = out_dir / ITEMS_NAME
    if path.is_file() and hashlib.sha256(path.read_bytes()).digest() != hashlib.sha256(text.encode()).digest():
        # Same shard plan but different images (another source tree): start the shards afresh.
        (out_dir / STATE_NAME).unlink(missing_ok=True)
    write_text_atomic(path, text)
    return path


def convert_imagenet(src: Path, out_dir: Path, *, samples_per_shard: int = 1000, processes: int = 2,
                     classes_from: str = "standard", seed: int = 0, labels_dir: Path | None = None,
                     progress: bool = True) -> Manifest:
    """Write train/val WebDataset shards + manifest.json for an ImageNet folder tree.

    Resumable: rerunning with the same source and settings keeps finished shards. Corrupt images
    are skipped and reported (stderr + manifest). `labels_dir`: where the devkit / Kaggle validation
    label files are, if not under src. Returns the manifest written to out_dir."""
    src, out_dir = Path(src), Path(out_dir)
    layout = detect_layout(src, labels_dir)
    wnids, names = class_order(layout.data_root, classes_from)
    items = list_items(layout, wnids, seed=seed)
    for split, split_items in items.items():
        if not split_items:
            raise UserError(f"ImageNet source {src}: no images in {split}/")
        _check_unique_keys(split_items, split)
    if progress:
        print(f"[imagenet] {len(items['train'])} train + {len(items['val'])} val images, "
              f"{len(wnids)} classes, val labels from {layout.val_labels}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = items["train"] + items["val"]
    items_file = _write_items(out_dir, layout.data_root, flat)
    n_train = len(items["train"])
    splits = {"train": range(n_train), "val": range(n_train, len(flat))}
    result = build_shards(out_dir, splits, functools.partial(make_imagenet_sample, str(items_file)),
                          samples_per_shard=samples_per_shard, processes=processes, progress=progress)
    skipped = _parse_skipped(getattr(result, "skipped", []))
    _report_skipped(skipped)
    manifest = Manifest(
        dataset="imagenet", channels=3, image_size=0, image_format="jpg", factors=[], default_factor=None,
        num_samples=sum(info.num_samples for infos in result.values() for info in infos), seed=seed,
        splits=Manifest.splits_from(result), skipped=sorted(skipped),
        extra={"class_order": classes_from, "wnids": wnids, "class_names": names,
               "granularities": list(GRANULARITIES) if classes_from == "standard" else ["1000"],
               "val_labels": layout.val_labels, "source": str(src.resolve()),
               "skipped_reasons": dict(sorted(skipped.items())),
               "image_size_note": "0 = images keep their original sizes; the loader resizes"})
    write_manifest(out_dir, manifest)
    return manifest


def _parse_skipped(entries: list[str]) -> dict[str, str]:
    out = {}
    for entry in entries:
        name, _, reason = str(entry).partition("\t")
        out[name] = reason or "skipped"
    return out


def _report_skipped(skipped: dict[str, str]) -> None:
    if not skipped:
        return
    print(f"[imagenet] skipped {len(skipped)} corrupt or unreadable image(s):", file=sys.stderr)
    for name, reason in sorted(skipped.items()):
        print(f"[imagenet]   {name}: {reason}", file=sys.stderr)
