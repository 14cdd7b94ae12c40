"""The shard contract: WebDataset tar shards plus ``manifest.json``.

Every image dataset (DisLib, ImageNet) is written here the same way, so the loader, the label
schemes and the probes read one format:

* a sample is ``{"__key__": str, "png" | "jpg": bytes, "factors.npy": float32 1-D, "cls": int}``;
* shards are ``<split>-%06d.tar``; shard ``j`` of a split holds ``indices[j*sps:(j+1)*sps]``;
* ``manifest.json`` names the dataset, its factors (name, kind, value grid), the default
  classification factor and, per split, every shard with its sample count and sha256.

This module is the reading side, used at every training step and by the probes: the manifest
(``Manifest``, ``load_manifest``), shard checks and paths. The writing side (``build_shards``,
``write_shard``, ``write_manifest``, the seeded splits) runs once per dataset and lives in
``trainer.data.convert.shards``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypedDict

from trainer.errors import UserError
from trainer.storage import Location, is_uri, locate

MANIFEST_NAME = "manifest.json"
FACTOR_KINDS = ("categorical", "continuous", "periodic")
IMAGE_FORMATS = ("png", "jpg")


# ---- shard records ------------------------------------------------------------------------
@dataclass
class ShardInfo:
    """One finished shard: file name (relative to the dataset root), samples, sha256 hex."""

    name: str
    num_samples: int
    sha256: str


def open_shard(url: str | Path):
    """A shard opened for a sequential read: a local file, or an input stream from the storage
    its URI names (s3://...: streamed from the object store, never copied to local disk)."""
    if is_uri(url):
        return locate(url).open_input()
    return open(url, "rb")


def file_sha256(path: Path | str | Location, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file (a local path or a URI), read in chunks (shards can be large)."""
    digest = hashlib.sha256()
    with open_shard(str(path)) as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
    # where it was loaded from (not saved): a Path, or a Location for a URI (s3://...)
    root: Path | Location | None = field(default=None, compare=False)

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


def load_manifest(root: Path | str | Location) -> Manifest:
    """Read and validate ``root/manifest.json`` (root may also be the manifest file itself; a local
    folder or a URI such as s3://bucket/dsprites).

    Missing file, bad JSON, missing keys and missing shard files are UserErrors naming the file.
    """
    where = locate(root)
    path = where if where.name.endswith(".json") else where / MANIFEST_NAME
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
    folder = path.parent
    manifest.root = folder.local_path if folder.is_local else folder
    present = folder.files()  # one listing (one request on an object store), not one per shard
    for split in manifest.splits:
        for info in manifest.shards(split):
            if info.name not in present:
                raise UserError(f"{path}: shard {folder / info.name} is missing")
    return manifest


def verify_shards(root: Path | str | Location, manifest: Manifest, split: str | None = None) -> None:
    """Check every shard's sha256 against the manifest; a mismatch names the shard."""
    folder = locate(root)
    for name in ([split] if split else list(manifest.splits)):
        for info in manifest.shards(name):
            path = folder / info.name
            if not path.is_file():
                raise UserError(f"shard {path} is missing")
            if file_sha256(path) != info.sha256:
                raise UserError(f"shard {path}: sha256 does not match {MANIFEST_NAME} (corrupt or replaced)")


def shard_urls(root: Path | str | Location, manifest: Manifest, split: str) -> list[str]:
    """A split's shards in order: absolute paths, or URIs for a dataset on remote storage."""
    folder = locate(root)
    return [str(folder / info.name) for info in manifest.shards(split)]
