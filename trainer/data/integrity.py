"""Shard integrity before training: every shard's sha256 against manifest.json.

A mismatch stops the run with one line naming the shard (data.on_error=raise), or drops that shard
and counts its samples as skipped (data.on_error=skip). Verified shards are remembered in
<root>/.verified.json, keyed by name, size, mtime and sha256, so a rerun (and the Ray Train
workers after the driver's preflight) pays for hashing once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from trainer.data.shards import Manifest, file_sha256
from trainer.errors import RuntimeFault
from trainer.files import write_text_atomic

CACHE_NAME = ".verified.json"


def _stamp(path: Path, sha: str) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{sha}"


def _load_cache(root: Path) -> dict[str, str]:
    try:
        data = json.loads((root / CACHE_NAME).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(root: Path, cache: dict[str, str]) -> None:
    try:
        write_text_atomic(root / CACHE_NAME, json.dumps(cache, indent=0, sort_keys=True))
    except OSError:  # a read-only dataset folder: verify again next time
        pass


def verified(manifest: Manifest, split: str, on_error: str = "raise") -> tuple[Manifest, int]:
    """(the manifest, minus corrupt shards of `split` when skipping; samples skipped)."""
    root = Path(manifest.root)
    cache = _load_cache(root)
    good, skipped, changed = [], 0, False
    for info in manifest.shards(split):
        path = root / info.name
        if not path.is_file():
            problem = "is missing"
        elif cache.get(info.name) == _stamp(path, info.sha256):
            good.append(info)
            continue
        elif file_sha256(path) == info.sha256:
            cache[info.name] = _stamp(path, info.sha256)
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
