"""Shard integrity before training: every shard's sha256 against manifest.json.

A mismatch stops the run with one line naming the shard (data.on_error=raise), or drops that shard
and counts its samples as skipped (data.on_error=skip). Verified shards are remembered in
<root>/.verified.json, keyed by name, size, mtime and sha256, so a rerun (and the Ray Train
workers after the driver's preflight) pays for hashing once. The root may be a URI (s3://...):
shards are then hashed as a stream, and the cache is written beside them when the bucket allows.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pyarrow.fs as pafs

from trainer.data.shards import Manifest, file_sha256
from trainer.errors import RuntimeFault
from trainer.storage import Location, locate

CACHE_NAME = ".verified.json"


def _stamp(info: pafs.FileInfo, sha: str) -> str:
    return f"{info.size}:{info.mtime_ns}:{sha}"


def _load_cache(root: Location) -> dict[str, str]:
    try:
        data = json.loads((root / CACHE_NAME).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(root: Location, cache: dict[str, str]) -> None:
    try:
        (root / CACHE_NAME).write_text(json.dumps(cache, indent=0, sort_keys=True))
    except OSError:  # a read-only dataset folder or bucket: verify again next time
        pass


def verified(manifest: Manifest, split: str, on_error: str = "raise") -> tuple[Manifest, int]:
    """(the manifest, minus corrupt shards of `split` when skipping; samples skipped)."""
    root = locate(manifest.root)
    cache = _load_cache(root)
    good, skipped, changed = [], 0, False
    for info in manifest.shards(split):
        path = root / info.name
        found = path.info()
        if found.type != pafs.FileType.File:
            problem = "is missing"
        elif cache.get(info.name) == _stamp(found, info.sha256):
            good.append(info)
            continue
        elif file_sha256(path) == info.sha256:
            cache[info.name] = _stamp(found, info.sha256)
            changed = True
            good.append(info)
            continue
        else:
            problem = "sha256 does not match manifest.json (corrupt or replaced)"
        if on_error == "raise":
            raise RuntimeFault(f"shard {path}: {problem}; data.on_error=skip trains without it")
        print(f"warning: skipping shard {path} ({info.num_samples} samples): {problem}", file=sys.stderr, flush=True)
        skipped += info.num_samples
    if changed:
        _save_cache(root, cache)
    if not skipped:
        return manifest, 0
    splits = dict(manifest.splits)
    splits[split] = {**splits[split], "shards": good, "num_samples": sum(s.num_samples for s in good)}
    return replace(manifest, splits=splits), skipped
