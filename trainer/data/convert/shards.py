"""The shard writer: samples -> WebDataset tar shards + ``manifest.json`` (run once per dataset).

Every converter (procedural dSprites, the DisLib files, ImageNet folders) hands this module a
``make_sample(index)`` and the seeded splits; the format it writes is described in
``trainer.data.shards``, which is what training and the probes read.

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
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from trainer.data.shards import MANIFEST_NAME, Manifest, ShardInfo, file_sha256
from trainer.errors import UserError
from trainer.files import write_json_atomic, write_with_atomic

STATE_NAME = ".shards-state.json"
SHARD_PATTERN = "{split}-{index:06d}.tar"
# A fixed tar mtime makes shards byte-identical across runs (same seed -> same sha256).
_TAR_MTIME = 0.0


# ---- one shard ------------------------------------------------------------------------------
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


def tar_member_info(name: str, size: int) -> tarfile.TarInfo:
    """A member's header as webdataset's TarWriter writes it (ustar, 0444, bigdata, fixed mtime)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _TAR_MTIME, 0o444
    info.uname = info.gname = "bigdata"
    return info


class UstarWriter:
    """The bytes tarfile's stream mode ("w|", USTAR) writes for `tar_member_info` members, without
    tarfile's per-member Python: its header building was 27 % of writing the dSprites shards
    (py-spy, 30k samples; 21 -> 5 us a member). Only the name, size and checksum fields change from
    a template; names one ustar field cannot hold (over 100 bytes, non-ASCII) go through tarfile.
    tests/test_shards.py compares the bytes with tarfile's."""

    BLOCK, RECORD = 512, 512 * 20

    def __init__(self, fh):
        self.fh, self.written = fh, 0
        self.template = bytearray(tar_member_info("x", 0).tobuf(tarfile.USTAR_FORMAT))
        self.template[148:156] = b" " * 8  # the checksum is summed with its own field as spaces

    def add(self, name: str, data: bytes) -> None:
        raw = name.encode("ascii", "strict") if name.isascii() else b""
        if not raw or len(raw) > 100 or len(data) >= 8**11:
            header = self._tarfile_header(name, len(data))
        else:
            header = bytearray(self.template)
            header[0:100] = raw.ljust(100, b"\0")
            header[124:136] = b"%011o\0" % len(data)
            header[148:156] = b"%06o\0 " % sum(header)
        pad = -len(data) % self.BLOCK
        self._out(bytes(header), data, b"\0" * pad)

    @staticmethod
    def _tarfile_header(name: str, size: int) -> bytearray:
        return bytearray(tar_member_info(name, size).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape"))

    def _out(self, *parts: bytes) -> None:
        for part in parts:
            self.fh.write(part)
            self.written += len(part)

    def close(self) -> None:
        """Two zero blocks end the archive; tarfile's stream mode then pads to its 10 KiB record."""
        end = self.BLOCK * 2
        self._out(b"\0" * (end + (-(self.written + end) % self.RECORD)))


def write_shard(path: Path, samples: Iterable[dict]) -> ShardInfo:
    """Write samples into one tar atomically (trainer.files); returns its count and sha256.

    Written with the standard library in webdataset's layout (``<key>.<field>`` members,
    fields sorted), so shard writers need not import torch (webdataset does: ~600 MB per process).
    """
    path = Path(path)
    written: dict[str, Any] = {}

    def write_tar(tmp: Path) -> None:
        count = 0
        with open(tmp, "wb") as fh:
            tar = UstarWriter(fh)
            for sample in samples:
                encoded = _encode_sample(sample)
                key = encoded.pop("__key__")
                for field_name in sorted(encoded):
                    tar.add(f"{key}.{field_name}", encoded[field_name])
                count += 1
            tar.close()
        written.update(count=count, sha=file_sha256(tmp))

    write_with_atomic(path, write_tar)
    return ShardInfo(name=path.name, num_samples=written["count"], sha256=written["sha"])


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
        write_json_atomic(out_dir / STATE_NAME, state, sort_keys=False)  # after each shard: resumable
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


# ---- manifest ------------------------------------------------------------------------------
def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    """Write ``out_dir/manifest.json`` atomically; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    write_json_atomic(path, manifest.to_dict(), sort_keys=False)  # keys in reading order
    manifest.root = out_dir
    return path
