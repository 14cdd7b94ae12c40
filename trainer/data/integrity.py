"""Shard integrity before training: every shard's bytes and samples against manifest.json.

What is checked, and when:

* **When.** By the driver's preflight (``trainer/run.py``), before Ray starts and before an MLflow
  run opens, for the split a run trains on; again by each Ray Train worker as it builds its loader
  (``trainer/data/images.py``), which finds the driver's pass in the cache. Nothing is re-hashed
  while a run trains: a shard changed mid-run meets only the loader's own checks (tar structure,
  decoding), which stop the run or skip the sample.
* **What.** The shard's sha256 against the manifest; then, in the same read, its samples: each has
  the image field, ``factors.npy`` (a numeric 1-D .npy, never a pickle, with one value per
  manifest factor, categorical values on their grid) and ``cls`` (an integer class within the
  default factor's values, or the dataset's classes); the shard holds the samples the manifest
  says.
* **Cache.** A verified shard is remembered in ``<root>/.verified.json`` under its name, keyed by
  size, mtime_ns and sha256 and, for a local file, its ctime_ns and inode: restoring a changed
  file's size and mtime (``os.utime``) still moves its ctime, so the shard is read again. On an
  object store (s3://...) an object cannot be rewritten without a new mtime.

On a problem: ``data.on_error=raise`` stops with one line naming the shard (and the sample);
``skip`` drops a shard whose bytes are wrong (its samples counted as skipped) and leaves bad
samples to the loader, which skips and counts them. A split with no usable sample left stops in one
line either way: the loader would otherwise read it forever.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass, replace

import pyarrow.fs as pafs

from trainer.data.npy import NpyReader
from trainer.data.shards import Manifest, ShardInfo, open_shard
from trainer.data.tario import group_samples, tar_members
from trainer.errors import RuntimeFault, UserError
from trainer.storage import Location, locate

CACHE_NAME = ".verified.json"
STAMP_VERSION = "v2"  # v2: samples checked too (older stamps are verified again)
FIX = "rewrite the shards (`linrep data ...`)"


# ---- the cache ------------------------------------------------------------------------------------
def _stamp(path: Location, found: pafs.FileInfo, sha: str) -> str:
    """What one verification is keyed by: size, mtime and, locally, ctime and inode, plus the sha256."""
    parts: list[object] = [STAMP_VERSION, found.size, found.mtime_ns]
    if path.is_local:
        st = os.stat(path.local_path)
        parts += [st.st_ctime_ns, st.st_ino]
    return ":".join(str(p) for p in [*parts, sha])


def _load_cache(root: Location) -> dict[str, dict]:
    try:
        data = json.loads((root / CACHE_NAME).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(root: Location, cache: dict[str, dict]) -> None:
    try:
        (root / CACHE_NAME).write_text(json.dumps(cache, indent=0, sort_keys=True))
    except OSError:  # a read-only dataset folder or bucket: verify again next time
        pass


# ---- one shard ------------------------------------------------------------------------------------
@dataclass
class ShardCheck:
    """What one read of a shard found: a shard-level problem (unusable), or its bad samples."""

    problem: str | None = None   # missing, wrong bytes, not a tar: the whole shard is unusable
    bad: int = 0                 # samples that break the contract (the loader skips them on skip)
    first: str | None = None     # the first bad sample's problem, one line

    def to_cache(self, stamp: str) -> dict:
        return {"stamp": stamp, "bad": self.bad, "first": self.first}

    @classmethod
    def from_cache(cls, entry: object, stamp: str) -> "ShardCheck | None":
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("bad"), int):
            return cls(None, entry["bad"], entry.get("first"))
        return None


def class_count(manifest: Manifest) -> tuple[int, str] | None:
    """(how many values `cls` may take, what they are), or None when the manifest does not say."""
    if manifest.default_factor:
        factor = manifest.factor(manifest.default_factor)
        return factor["size"], f"the values of factor {factor['name']}"
    wnids = manifest.extra.get("wnids")
    return (len(wnids), "the dataset's classes") if wnids else None


class SampleRules:
    """The shard contract for one sample (trainer/data/shards.py), as one-line problems."""

    def __init__(self, manifest: Manifest):
        self.image = manifest.image_format
        self.names = manifest.factor_names
        self.grids = {j: sorted(float(v) for v in f["values"]) for j, f in enumerate(manifest.factors)
                      if f["kind"] == "categorical"}
        self.classes = class_count(manifest)
        self._npy = NpyReader()

    def problem(self, sample: dict) -> str | None:
        missing = [f for f in (self.image, "factors.npy", "cls") if f not in sample]
        if missing:
            has = sorted(k for k in sample if not k.startswith("__"))
            return f"has no {' or '.join(missing)} (its fields: {', '.join(has) or 'none'})"
        return self._factors(sample["factors.npy"]) or self._cls(sample["cls"])

    def _factors(self, data: bytes) -> str | None:
        try:
            values = self._npy.read(data)
        except ValueError as err:
            return f"factors.npy is not a numeric .npy array ({str(err).splitlines()[0][:80]})"
        if values.ndim != 1:
            return f"factors.npy is a {values.dtype} array of shape {values.shape}, expected a 1-D float vector"
        if len(values) != len(self.names):
            return (f"factors.npy holds {len(values)} values, manifest.json lists {len(self.names)} factors "
                    f"({', '.join(self.names) or 'none'})")
        row = values.tolist()
        for j, grid in self.grids.items():
            if not on_grid(row[j], grid):
                return f"factor {self.names[j]}={row[j]:g} is not one of its {len(grid)} values in manifest.json"
        return None

    def _cls(self, data: bytes) -> str | None:
        text = data.decode("ascii", "replace").strip()
        if not text.lstrip("-").isdigit():
            return f"cls {text[:20]!r} is not a class index"
        if self.classes is not None and not 0 <= int(text) < self.classes[0]:
            return f"cls {int(text)} is outside 0..{self.classes[0] - 1} ({self.classes[1]})"
        return None


def on_grid(value: float, grid: list[float]) -> bool:
    """`value` is one of the sorted `grid` values (float32 round-off allowed); a bisection, as
    np.isclose per sample cost ~35 us."""
    i = bisect.bisect_left(grid, value)
    return any(abs(grid[k] - value) <= 1e-6 + 1e-5 * abs(grid[k]) for k in (i - 1, i) if 0 <= k < len(grid))


def check_shard(path: Location, info: ShardInfo, rules: SampleRules) -> ShardCheck:
    """Read a shard once: its sha256 against the manifest, then every sample against the rules."""
    with open_shard(str(path)) as fh:
        data = fh.read()
    if hashlib.sha256(data).hexdigest() != info.sha256:
        return ShardCheck(problem="sha256 does not match manifest.json (corrupt or replaced)")
    check, count = ShardCheck(), 0
    try:
        for sample in group_samples(tar_members(io.BytesIO(data)), str(path)):
            count += 1
            problem = rules.problem(sample)
            if problem:
                check.bad += 1
                check.first = check.first or f"shard {path}: sample {sample['__key__']}: {problem}"
    except (tarfile.TarError, ValueError, EOFError) as err:  # a bad header, a member cut short, a field twice
        return ShardCheck(problem=f"not a readable tar ({str(err).splitlines()[0][:120]})")
    if count != info.num_samples:
        check.bad = max(check.bad, 1)
        check.first = check.first or f"shard {path}: holds {count} samples, manifest.json says {info.num_samples}"
    return check


# ---- a split ---------------------------------------------------------------------------------------
def require_samples(manifest: Manifest, split: str) -> None:
    """A split a run reads must hold samples (UserError naming the split and the folder)."""
    if manifest.split_samples(split) <= 0 or not manifest.shards(split):
        raise UserError(f"data.root={manifest.root}: split '{split}' has no samples "
                        f"({len(manifest.shards(split))} shards in manifest.json); {FIX}")


def _verify_one(root: Location, info: ShardInfo, cache: dict, rules: SampleRules) -> tuple[ShardCheck, bool]:
    """(what the shard holds, whether the cache gained an entry): from the cache when its stamp fits."""
    path = root / info.name
    found = path.info()
    if found.type != pafs.FileType.File:
        return ShardCheck(problem="is missing"), False
    stamp = _stamp(path, found, info.sha256)
    hit = ShardCheck.from_cache(cache.get(info.name), stamp)
    if hit is not None:
        return hit, False
    try:
        check = check_shard(path, info, rules)
    except OSError as err:
        return ShardCheck(problem=f"cannot be read ({err.__class__.__name__})"), False
    if check.problem is None:
        cache[info.name] = check.to_cache(stamp)
        return check, True
    return check, False


def _nothing_usable(split: str, root: Location, shards: int, warnings: list[str], first_bad: str | None) -> str:
    """The one line for a split (read with data.on_error=skip) that has no usable sample left."""
    if len(warnings) == shards:
        example = warnings[0].removeprefix("warning: skipping ")
        return (f"data.on_error=skip: every shard of split '{split}' is corrupt ({shards} of {shards}, "
                f"e.g. {example}); {FIX}")
    return f"data.on_error=skip: no sample of split '{split}' under {root} is usable (e.g. {first_bad}); {FIX}"


def verified(manifest: Manifest, split: str, on_error: str = "raise") -> tuple[Manifest, int]:
    """(the manifest, minus corrupt shards of `split` when skipping; samples skipped).

    Raises RuntimeFault (one line naming the shard) for a corrupt shard or sample with on_error=raise,
    and for a split with no usable sample left; the driver's preflight reports it as bad input."""
    require_samples(manifest, split)
    root = locate(manifest.root)
    cache, rules = _load_cache(root), SampleRules(manifest)
    good, warnings, skipped, usable, changed = [], [], 0, 0, False
    first_bad: str | None = None
    for info in manifest.shards(split):
        check, added = _verify_one(root, info, cache, rules)
        changed |= added
        if check.problem is None and not (check.bad and on_error == "raise"):
            good.append(info)
            usable += info.num_samples - check.bad
            first_bad = first_bad or check.first
            continue
        if on_error == "raise":
            raise RuntimeFault(f"{check.first}; {FIX} or set data.on_error=skip" if check.problem is None else
                               f"shard {root / info.name}: {check.problem}; data.on_error=skip trains without it")
        warnings.append(f"warning: skipping shard {root / info.name} ({info.num_samples} samples): {check.problem}")
        skipped += info.num_samples
    if usable <= 0:
        raise RuntimeFault(_nothing_usable(split, root, len(manifest.shards(split)), warnings, first_bad))
    for line in warnings:
        print(line, file=sys.stderr, flush=True)
    if changed:
        _save_cache(root, cache)
    if not skipped:
        return manifest, 0
    splits = dict(manifest.splits)
    splits[split] = {**splits[split], "shards": good, "num_samples": sum(s.num_samples for s in good)}
    return replace(manifest, splits=splits), skipped
