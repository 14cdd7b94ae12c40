"""Features of the annotated ImageNet validation images: the val shards read in order, decoded in
DataLoader workers, fed through an extractor; optionally saved as an .npz."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from probes.imagenetx.extractors import Extractor
from trainer.errors import UserError
from trainer.files import write_with_atomic


class _ValImages(torch.utils.data.IterableDataset):
    """(key, transformed image) of the annotated images of the val shards, decoded in workers."""

    def __init__(self, urls: list[str], wanted: set[str], transform: Callable):
        self.urls, self.wanted, self.transform = urls, wanted, transform

    def __iter__(self):
        import webdataset as wds
        from PIL import Image

        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else self.urls[info.id::info.num_workers]
        # nodesplitter=None: every caller reads all shards (the default refuses under Ray/torchrun).
        for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False):
            key = sample["__key__"]
            if key not in self.wanted:
                continue  # skip before decoding: most of the cost
            data = sample.get("jpg") or sample.get("jpeg") or sample.get("png")
            if data is None:
                raise UserError(f"{sample.get('__url__', 'val shard')}: sample {key} has no jpg/png image")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    image = self.transform(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as err:
                raise UserError(f"{sample.get('__url__', 'val shard')}: image {key} cannot be decoded "
                                f"({err.__class__.__name__})") from None
            yield key, image


def val_shard_urls(shards_root: Path) -> list[str]:
    """The val split's shard paths from the manifest (UserError if missing)."""
    from trainer.data.shards import load_manifest, shard_urls

    manifest = load_manifest(Path(shards_root))
    if "val" not in manifest.splits:
        raise UserError(f"{shards_root}: the manifest has no val split (splits: {', '.join(manifest.splits)})")
    return shard_urls(Path(shards_root), manifest, "val")


def extract_features(urls: list[str], extractor: Extractor, wanted: set[str], *, batch_size: int = 64,
                     loader_workers: int = 2, max_images: int | None = None,
                     progress: bool = True) -> tuple[list[str], np.ndarray]:
    """(keys, features [n, p] float32) of the wanted images of the given shards."""
    loader = torch.utils.data.DataLoader(
        _ValImages(urls, wanted, extractor.transform), batch_size=batch_size,
        num_workers=min(loader_workers, len(urls)), collate_fn=_collate)
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    start, next_report = time.monotonic(), 0
    for batch_keys, images in loader:
        if max_images is not None and len(keys) >= max_images:
            break
        chunks.append(extractor.features(images).float().cpu().numpy())
        keys.extend(batch_keys)
        if progress and len(keys) >= next_report:
            print(f"[imagenetx] {extractor.label}: {len(keys):,} images ({time.monotonic() - start:.0f} s)",
                  file=sys.stderr, flush=True)
            next_report += 50 * batch_size
    if not keys:
        raise UserError(f"no annotated ImageNet-X images in the val shards ({len(urls)} shards): "
                        "were they written from the ImageNet validation set with file stems as keys?")
    X = np.concatenate(chunks)
    if max_images is not None:
        keys, X = keys[:max_images], X[:max_images]
    return keys, X


def _collate(batch):
    keys = [k for k, _ in batch]
    return keys, torch.stack([img for _, img in batch])



def write_features(path: Path, keys: np.ndarray, X: np.ndarray) -> None:
    """features-<model>.npz: the image keys and their feature rows, written atomically."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to the temp name
            np.savez(f, keys=keys.astype(str), features=X)

    write_with_atomic(path, save)
