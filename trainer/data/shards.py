"""The shard contract: WebDataset tar shards plus ``manifest.json``.

Every image dataset (DisLib, ImageNet) is written here the same way, so the loader, the label
schemes and the probes read one format:

* a sample is ``{"__key__": str, "png" | "jpg": bytes, "factors.npy": float32 1-D, "cls": int}``;
* shards are ``<split>-%06d.tar``; shard ``j`` of a split holds ``indices[j*sps:(j+1)*sps]``;
* ``manifest.json`` names the dataset, its factors (name, kind, value grid), the default
  classification factor and, per split, every shard with its sample count and sha256.

``build_shards`` renders shards in parallel (one task per shard), writes each atomically and
records finished shards in ``.shards-state.json`` so an interrupted conversion resumes where
it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence, TypedDict

import numpy as np

from trainer.errors import UserError

MANIFEST_NAME = "manifest.json"
STATE_NAME = ".shards-state.json"
SHARD_PATTERN = "{split}-{index:06d}.tar"
FACTOR_KINDS = ("categorical", "continuous", "periodic")
IMAGE_FORMATS = ("png", "jpg")
# A fixed tar mtime makes shards byte-identical across runs (same seed -> same sha256).
_TAR_MTIME = 0.0


# ---- sample and shard records --------------------------------------------------------------
@dataclass
class ShardInfo:
    """One finished shard: file name (relative to the dataset root), samples, sha256 hex."""

    name: str
    num_samples: int
    sha256: str


class SkipSample(Exception):
    """Raised by a ``make_sample`` to skip one input; the message is recorded as its skipped key."""


class BuildResult(dict):
    """``build_shards``' result: split -> [ShardInfo], plus ``.skipped`` (keys or reasons)."""

    skipped: list[str]


def encode_npy(array: np.ndarray) -> bytes:
    """npy bytes, exactly as webdataset's encoder writes ``.npy`` (numpy.lib.format)."""
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.ascontiguousarray(array))
    return stream.getvalue()


def _encode_sample(sample: dict) -> dict:
    """Plain bytes for every field: numpy arrays -> npy, ints -> ascii, bytes unchanged."""
    if "__key__" not in sample:
        raise ValueError("a shard sample needs a '__key__'")
    out: dict[str, Any] = {"__key__": str(sample["__key__"])}
    for name, value in sample.items():
        if name == "__key__":
            continue
        if isinstance(value, np.ndarray):
            out[name] = encode_npy(value)
        elif isinstance(value, (int, np.integer)):
            out[name] = str(int(value)).encode("ascii")
        elif isinstance(value, str):
            out[name] = value.encode("utf-8")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            out[name] = bytes(value)
        else:
            raise ValueError(f"sample {out['__key__']}: field {name} has unsupported type {type(value).__name__}")
    return out


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member laid out as webdataset's TarWriter writes it (ustar, 0444, bigdata)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Iterable[dict]) -> ShardInfo:
    """Write samples into one tar (temp name, then os.replace); returns its count and sha256.

    Written with the standard library in webdataset's layout (``<key>.<field>`` members,
    fields sorted), so shard writers need not import torch (webdataset does: ~600 MB per process).
    """
    path = Path(path)
    tmp = _tmp_name(path)
    count = 0
    try:
        with open(tmp, "wb") as fh, tarfile.open(fileobj=fh, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                encoded = _encode_sample(sample)
                key = encoded.pop("__key__")
                for field_name in sorted(encoded):
                    _add_member(tar, f"{key}.{field_name}", encoded[field_name])
                count += 1
        sha = file_sha256(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardInfo(name=path.name, num_samples=count, sha256=sha)


# ---- building many shards --------------------------------------------------------------------
@dataclass
class _ShardTask:
    split: str
    index: int
    indices: np.ndarray


def _plan(splits: dict[str, Sequence[int]], samples_per_shard: int) -> list[_ShardTask]:
    tasks = []
    for split, indices in splits.items():
        indices = np.asarray(indices, dtype=np.int64)
        for j, start in enumerate(range(0, len(indices), samples_per_shard)):
            tasks.append(_ShardTask(split, j, indices[start:start + samples_per_shard]))
    return tasks


def _plan_fingerprint(tasks: list[_ShardTask]) -> str:
    """Changes when splits, order or shard size change: a stale state file is then ignored."""
    digest = hashlib.sha256()
    for t in tasks:
        digest.update(f"{t.split}/{t.index}:".encode())
        digest.update(t.indices.tobytes())
    return digest.hexdigest()


def _build_one(make_sample: Callable[[int], dict | None], out_dir: Path,
               task: _ShardTask) -> tuple[_ShardTask, ShardInfo, list[str]]:
    """Worker: render one shard's samples and write the shard; return its info and skips."""
    skipped: list[str] = []

    def samples():
        for index in task.indices:
            try:
                sample = make_sample(int(index))
            except SkipSample as why:
                skipped.append(str(why))
                continue
            if sample is None:
                skipped.append(str(int(index)))
                continue
            yield sample

    name = SHARD_PATTERN.format(split=task.split, index=task.index)
    info = write_shard(out_dir / name, samples())
    return task, info, skipped


def _read_state(out_dir: Path, fingerprint: str) -> dict[str, Any]:
    empty = {"plan": fingerprint, "shards": {}, "skipped": {}}
    try:
        state = json.loads((out_dir / STATE_NAME).read_text())
    except (OSError, ValueError):
        return empty
    if not isinstance(state, dict) or state.get("plan") != fingerprint:
        return empty
    return state


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def build_shards(out_dir: Path, splits: dict[str, Sequence[int]], make_sample: Callable[[int], dict | None],
                 *, samples_per_shard: int = 10000, processes: int = 1,
                 progress: bool = True) -> dict[str, list[ShardInfo]]:
    """Write every split's samples into shards, in parallel over shards, resumably.

    ``make_sample(index)`` returns a sample dict, or None (or raises ``SkipSample``) to skip an
    input; skipped keys are printed and returned in ``result.skipped``. ``make_sample`` must be
    picklable when ``processes > 1`` (a module-level function or a functools.partial of one).
    """
    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = _plan(splits, samples_per_shard)
    state = _read_state(out_dir, _plan_fingerprint(tasks))
    done: dict[str, dict] = state["shards"]
    todo = [t for t in tasks if not _finished(out_dir, done, t)]
    reporter = _Progress(len(tasks), len(tasks) - len(todo), progress)

    def record(task: _ShardTask, info: ShardInfo, skipped: list[str]) -> None:
        done[info.name] = asdict(info)
        state["skipped"][info.name] = skipped
        write_json_atomic(out_dir / STATE_NAME, state)  # after each shard: resumable
        reporter.shard_done(info, skipped)

    worker = functools.partial(_build_one, make_sample, out_dir)
    if processes > 1 and len(todo) > 1:
        # spawn: the caller may hold threads (Ray, torch) that make fork unsafe.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(processes, len(todo))) as pool:
            for result in pool.imap_unordered(worker, todo):
                record(*result)
    else:
        for task in todo:
            record(*worker(task))
    return _collect(tasks, done, state["skipped"])


def _finished(out_dir: Path, done: dict[str, dict], task: _ShardTask) -> bool:
    name = SHARD_PATTERN.format(split=task.split, index=task.index)
    return name in done and (out_dir / name).is_file()


def _collect(tasks: list[_ShardTask], done: dict[str, dict], skipped: dict[str, list[str]]) -> BuildResult:
    result = BuildResult()
    result.skipped = []
    for t in tasks:
        name = SHARD_PATTERN.format(split=t.split, index=t.index)
        result.setdefault(t.split, []).append(ShardInfo(**done[name]))
        result.skipped.extend(skipped.get(name, []))
    for split in result:
        result[split].sort(key=lambda info: info.name)
    if result.skipped:
        print(f"[shards] skipped {len(result.skipped)} inputs: {', '.join(result.skipped[:10])}"
              + (" ..." if len(result.skipped) > 10 else ""), file=sys.stderr)
    return result


class _Progress:
    """One stderr line per finished shard: name, samples, shards done/total, elapsed."""

    def __init__(self, total: int, already: int, enabled: bool):
        self.total, self.done, self.enabled = total, already, enabled
        self.start = time.monotonic()
        if enabled and already:
            print(f"[shards] resuming: {already}/{total} shards already complete", file=sys.stderr)

    def shard_done(self, info: ShardInfo, skipped: list[str]) -> None:
        self.done += 1
        if self.enabled:
            extra = f", {len(skipped)} skipped" if skipped else ""
            print(f"[shards] {info.name}: {info.num_samples} samples{extra} "
                  f"({self.done}/{self.total} shards, {time.monotonic() - self.start:.1f} s)",
                  file=sys.stderr, flush=True)


# ---- splits -------------------------------------------------------------------------------------
SPLIT_NAMES = ("train", "val", "test")


def split_indices(n: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    """Seeded split of range(n) by sample: train/val/test (80/10/10 by default).

    Each split keeps the permuted order, so every shard is a random sample of the dataset and
    "the first shards" (data.max_samples) is a random subset rather than a corner of the grid.
    """
    if len(fractions) != len(SPLIT_NAMES) or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1):
        raise UserError(f"split fractions {tuple(fractions)}: need three non-negative numbers summing to 1")
    order = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    bounds = [0, n_train, min(n, n_train + n_val), n]
    return {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(SPLIT_NAMES)}


# ---- manifest -----------------------------------------------------------------------------------
class Factor(TypedDict):
    """One ground-truth factor: its name, kind, number of values and value grid."""

    name: str
    kind: Literal["categorical", "continuous", "periodic"]
    size: int
    values: list[float]


def make_factor(name: str, kind: str, values: Sequence[float]) -> Factor:
    values = [float(v) for v in values]
    return Factor(name=name, kind=kind, size=len(values), values=values)  # type: ignore[typeddict-item]


@dataclass
class Manifest:
    """What ``manifest.json`` says about a shard folder (see module docstring)."""

    dataset: str
    channels: int
    image_size: int
    image_format: Literal["png", "jpg"]
    factors: list[Factor]
    default_factor: str | None
    num_samples: int
    seed: int
    splits: dict[str, dict[str, Any]]  # split -> {"num_samples": int, "shards": [ShardInfo]}
    skipped: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path | None = field(default=None, compare=False)  # where it was loaded from (not saved)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def factor_names(self) -> list[str]:
        return [f["name"] for f in self.factors]

    def factor(self, name: str) -> Factor:
        for f in self.factors:
            if f["name"] == name:
                return f
        raise UserError(f"dataset {self.dataset} has no factor '{name}' (factors: {', '.join(self.factor_names)})")

    def factor_index(self, name: str) -> int:
        return self.factor_names.index(self.factor(name)["name"])

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise UserError(f"dataset {self.dataset} has no split '{split}' (splits: {', '.join(self.splits)})")
        return list(self.splits[split]["shards"])

    def split_samples(self, split: str) -> int:
        self.shards(split)  # validates the name
        return int(self.splits[split]["num_samples"])

    @staticmethod
    def splits_from(shards: dict[str, list[ShardInfo]]) -> dict[str, dict[str, Any]]:
        """build_shards' result -> the manifest's splits section."""
        return {split: {"num_samples": sum(s.num_samples for s in infos), "shards": list(infos)}
                for split, infos in shards.items()}

    # -- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "root"}
        d["splits"] = {s: {"num_samples": int(v["num_samples"]),
                           "shards": [asdict(i) if isinstance(i, ShardInfo) else dict(i) for i in v["shards"]]}
                       for s, v in self.splits.items()}
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = MANIFEST_NAME) -> "Manifest":
        _check_manifest_dict(raw, source)
        splits = {s: {"num_samples": int(v["num_samples"]), "shards": [ShardInfo(**i) for i in v["shards"]]}
                  for s, v in raw["splits"].items()}
        factors = [Factor(name=f["name"], kind=f["kind"], size=int(f["size"]),
                          values=[float(x) for x in f["values"]]) for f in raw["factors"]]
        return cls(dataset=raw["dataset"], channels=int(raw["channels"]), image_size=int(raw["image_size"]),
                   image_format=raw["image_format"], factors=factors, default_factor=raw["default_factor"],
                   num_samples=int(raw["num_samples"]), seed=int(raw["seed"]), splits=splits,
                   skipped=list(raw.get("skipped", [])), extra=dict(raw.get("extra", {})))

    def save(self, out_dir: Path) -> Path:
        return write_manifest(out_dir, self)

    @classmethod
    def load(cls, root: Path) -> "Manifest":
        return load_manifest(root)


_REQUIRED = ("dataset", "channels", "image_size", "image_format", "factors", "default_factor",
             "num_samples", "seed", "splits")


def _check_manifest_dict(raw: Any, source: str) -> None:
    """Every problem is one line naming the manifest and the key."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise UserError(f"{source}: missing key(s) {', '.join(missing)}")
    if raw["image_format"] not in IMAGE_FORMATS:
        raise UserError(f"{source}: image_format={raw['image_format']!r}, expected png or jpg")
    if not isinstance(raw["factors"], list):
        raise UserError(f"{source}: 'factors' must be a list")
    for i, f in enumerate(raw["factors"]):
        if not isinstance(f, dict) or any(k not in f for k in ("name", "kind", "size", "values")):
            raise UserError(f"{source}: factors[{i}] needs name, kind, size and values")
        if f["kind"] not in FACTOR_KINDS:
            raise UserError(f"{source}: factor {f['name']} has kind {f['kind']!r}, expected one of {FACTOR_KINDS}")
        if int(f["size"]) != len(f["values"]):
            raise UserError(f"{source}: factor {f['name']} has size {f['size']} but {len(f['values'])} values")
    names = [f["name"] for f in raw["factors"]]
    if raw["default_factor"] is not None and raw["default_factor"] not in names:
        raise UserError(f"{source}: default_factor {raw['default_factor']!r} is not a factor ({', '.join(names)})")
    if not isinstance(raw["splits"], dict) or not raw["splits"]:
        raise UserError(f"{source}: 'splits' must be a non-empty object")
    for split, v in raw["splits"].items():
        if not isinstance(v, dict) or "num_samples" not in v or not isinstance(v.get("shards"), list):
            raise UserError(f"{source}: split '{split}' needs num_samples and a shards list")
        for i, info in enumerate(v["shards"]):
            if not isinstance(info, dict) or set(info) != {"name", "num_samples", "sha256"}:
                raise UserError(f"{source}: split '{split}' shard {i} needs exactly name, num_samples, sha256")


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    """Write ``out_dir/manifest.json`` atomically; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict())
    manifest.root = out_dir
    return path


def load_manifest(root: Path) -> Manifest:
    """Read and validate ``root/manifest.json`` (root may also be the manifest file itself).

    Missing file, bad JSON, missing keys and missing shard files are UserErrors naming the file.
    """
    root = Path(root)
    path = root if root.suffix == ".json" else root / MANIFEST_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no manifest here (write the shards with `linrep data ...` first)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err.__class__.__name__})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    try:
        manifest = Manifest.from_dict(raw, str(path))
    except (TypeError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"{path}: malformed value ({err})") from None
    manifest.root = path.parent
    for split in manifest.splits:
        for info in manifest.shards(split):
            if not (path.parent / info.name).is_file():
                raise UserError(f"{path}: shard {path.parent / info.name} is missing")
    return manifest


def verify_shards(root: Path, manifest: Manifest, split: str | None = None) -> None:
    """Check every shard's sha256 against the manifest; a mismatch names the shard."""
    root = Path(root)
    for name in ([split] if split else list(manifest.splits)):
        for info in manifest.shards(name):
            path = root / info.name
            if not path.is_file():
                raise UserError(f"shard {path} is missing")
            if file_sha256(path) != info.sha256:
                raise UserError(f"shard {path}: sha256 does not match {MANIFEST_NAME} (corrupt or replaced)")


def shard_urls(root: Path, manifest: Manifest, split: str) -> list[str]:
    """Absolute paths of a split's shards, in order."""
    root = Path(root).resolve()
    return [str(root / info.name) for info in manifest.shards(split)]
