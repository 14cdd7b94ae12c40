"""Storage as a URI: the one module that reads and writes run folders, checkpoints, sweep folders
and shard sets, wherever they live.

    locate("./ray_results")              local folder (absolute, resolved: today's behaviour)
    locate("file:///mnt/shared/linrep")  the same, spelled as a URI
    locate("s3://bucket/ray_results")    an S3 (or S3-compatible) bucket
    locate("gs://...") / "hdfs://..."    any filesystem pyarrow.fs.FileSystem.from_uri knows

A `Location` is a filesystem (pyarrow.fs) plus a path inside it; `str(location)` is what users
see and what travels between processes (a local path, or the URI). Every process re-opens the
filesystem from that string, so credentials never travel: S3 keys, region and endpoint come only
from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), never from a config, a param or a checkpoint.

Writes are atomic on both kinds: local files go through trainer.files (temp + fsync + rename); an
object store's PUT replaces an object whole.
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from trainer.errors import UserError
from trainer.files import write_bytes_atomic

SUPPORTED = "a local path, file://, s3://, gs:// or hdfs://"


@functools.lru_cache(maxsize=None)
def _local_fs() -> pafs.FileSystem:
    return pafs.LocalFileSystem()


# A request whose transfer stalls (no byte for this long) is abandoned, then retried: the AWS SDK's
# 3 attempts. pyarrow's default is the SDK's 3 s, with which a checkpoint upload failed 11 s into a
# store that had paused (moto SIGSTOPped: 3 attempts x 3 s); at 60 s (boto3's read timeout) the same
# upload finished the moment the store came back, 20 s later. So a store away for up to ~3 minutes
# is waited out; longer, and the run fails in one line and resumes from its last complete checkpoint.
# Ray Train gets this filesystem pickled: the timeout survives pickling (a retry_strategy does not,
# pyarrow 25), so its own checkpoint uploads wait the same way.
S3_REQUEST_TIMEOUT_S = 60.0
# check_reachable asks "is the store there?" before anything starts, and must answer in seconds:
# 2 attempts of 4 s (a paused store: one line after ~8 s).
S3_CHECK_TIMEOUT_S, S3_CHECK_ATTEMPTS = 4.0, 2


@functools.lru_cache(maxsize=8)
def _s3_fs(endpoint: str | None, region: str | None, quick: bool = False) -> pafs.FileSystem:
    """S3 from the environment. The endpoint is passed explicitly because older pyarrow releases
    ignore AWS_ENDPOINT_URL(_S3); keys stay with the AWS SDK's own environment lookup, so they are
    never part of the filesystem object that Ray serialises to its workers. `quick`: the
    short-timeout client check_reachable uses (never handed to Ray)."""
    kwargs: dict[str, Any] = {"request_timeout": S3_REQUEST_TIMEOUT_S}
    if quick:
        kwargs["request_timeout"] = S3_CHECK_TIMEOUT_S
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_CHECK_ATTEMPTS)
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _s3_from_env(quick: bool = False) -> pafs.FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
    return _s3_fs(endpoint, region, quick)


def is_uri(spec: str | os.PathLike) -> bool:
    """True for scheme://... (a local path never contains '://')."""
    return "://" in str(spec)


def locate(spec: "str | os.PathLike | Location") -> "Location":
    """The Location a storage spec names; UserError (one line) for a scheme nobody can open."""
    if isinstance(spec, Location):
        return spec
    text = str(spec)
    if not is_uri(text):
        return Location(_local_fs(), str(Path(text).expanduser().resolve()), "")
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return locate(rest or "/")
    if scheme in ("s3", "s3a"):
        path = _clean(rest)
        if not path or path.startswith("/"):
            raise UserError(f"storage {text!r}: an S3 URI is s3://BUCKET/PATH")
        return Location(_s3_from_env(), path, "s3")
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (ValueError, OSError) as err:  # pyarrow.lib.ArrowInvalid is a ValueError
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else err.__class__.__name__
        raise UserError(f"storage {text!r} cannot be opened ({first}); use {SUPPORTED}") from None
    return Location(fs, _clean(path), scheme)


def _clean(path: str) -> str:
    """A posix path without a trailing slash, '.' parts or doubled slashes ('..' is kept: the
    containment check must see it)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(parts)


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem: `fs` + `path` inside it; `scheme` '' means local."""

    fs: pafs.FileSystem
    path: str
    scheme: str = ""

    # ---- naming ----------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"Location({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Location):
            return str(self) == str(other)
        if isinstance(other, os.PathLike) and self.is_local:  # a local Location equals its Path
            return self.path == os.fspath(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))

    def __fspath__(self) -> str:
        """A local Location is path-like (open(), Path(), os.path work on it); a remote one is not."""
        if not self.is_local:
            raise TypeError(f"{self} is not on the local filesystem")
        return self.path

    @property
    def is_local(self) -> bool:
        return self.scheme == ""

    @property
    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self} is not on the local filesystem")
        return Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "Location":
        return Location(self.fs, posixpath.dirname(self.path) or self.path, self.scheme)

    def __truediv__(self, part: str) -> "Location":
        return self.child(part)

    def child(self, *parts: str) -> "Location":
        joined = posixpath.join(self.path, *[str(p) for p in parts])
        return Location(self.fs, posixpath.normpath(joined) if self.is_local else _clean(joined), self.scheme)

    def contains(self, other: "Location") -> bool:
        """`other` lies strictly inside this folder, after resolving '..' (same filesystem)."""
        if other.scheme != self.scheme:
            return False
        inner = posixpath.normpath("/" + other.path)
        outer = posixpath.normpath("/" + self.path)
        return inner != outer and inner.startswith(outer.rstrip("/") + "/")

    # ---- queries ---------------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def subdirs(self, prefix: str = "") -> list["Location"]:
        """Folders directly inside this one whose names start with `prefix` (none if missing)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [Location(self.fs, _norm(i.path, self), self.scheme) for i in infos
                if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith(prefix)]

    def files(self) -> dict[str, int]:
        """Every file under this folder (recursively): relative posix name -> size in bytes."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        base = self.path.rstrip("/") + "/"
        return {_norm(i.path, self)[len(base):]: i.size for i in infos if i.type == pafs.FileType.File}

    def check_reachable(self) -> None:
        """Fail in one line, before anything starts, when the storage does not answer or (on an
        object store) its bucket is missing: one request, instead of a Ray error deep in a run."""
        if self.is_local:
            return
        fs = _s3_from_env(quick=True) if self.scheme == "s3" else self.fs
        bucket = Location(fs, self.path.split("/", 1)[0], self.scheme)
        try:
            kind = bucket.info().type
        except OSError as err:
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else err.__class__.__name__
            raise UserError(f"storage {self} cannot be reached ({first}); check the AWS_* environment "
                            "(credentials, AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION)") from None
        if kind == pafs.FileType.NotFound and self.scheme in ("s3", "gs", "gcs"):
            raise UserError(f"storage {self}: bucket {bucket} does not exist or these credentials cannot see it")

    # ---- reads -----------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        """The file's bytes; FileNotFoundError when it is missing (on every filesystem)."""
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as err:
            if not self.exists():
                raise FileNotFoundError(str(self)) from None
            raise err

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_input(self):
        """A sequential input stream (read(n) / read()); the caller closes it."""
        return self.fs.open_input_stream(self.path)

    # ---- writes ----------------------------------------------------------------------------
    def write_bytes(self, data: bytes) -> None:
        if self.is_local:
            write_bytes_atomic(self.path, data)
            return
        with self.fs.open_output_stream(self.path) as f:  # one PUT: readers see all or nothing
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, obj: Any, *, sort_keys: bool = True) -> None:
        self.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")

    def touch(self) -> None:
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).touch()
        else:
            self.write_bytes(b"")

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if self.exists() or not missing_ok:
                raise

    def delete_dir(self) -> None:
        """Delete this folder and everything inside (nothing happens when it is missing)."""
        if self.exists():
            self.fs.delete_dir(self.path)

    def empty_dir(self) -> None:
        """Delete everything inside this folder, keeping the folder."""
        if self.exists():
            self.fs.delete_dir_contents(self.path, missing_dir_ok=True)

    # ---- transfers -------------------------------------------------------------------------
    def download(self, local_dir: Path | str) -> Path:
        """Copy this folder into `local_dir` (created); returns it."""
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, str(local_dir), source_filesystem=self.fs, destination_filesystem=_local_fs())
        return local_dir

    def download_files(self, names: list[str], local_dir: Path | str) -> Path:
        """Copy only the named files of this folder into `local_dir` (created); returns it."""
        local_dir = Path(local_dir)
        for name in names:
            target = local_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.child(name).read_bytes())
        return local_dir

    def upload(self, local_dir: Path | str) -> None:
        """Copy the local folder `local_dir` into this folder."""
        if self.is_local:
            shutil.copytree(local_dir, self.path, dirs_exist_ok=True)
            return
        pafs.copy_files(str(local_dir), self.path, source_filesystem=_local_fs(), destination_filesystem=self.fs)

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """This folder as a local Path: the folder itself when local (read it, never write into
        it), else a temporary download removed on exit."""
        if self.is_local:
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="linrep-dl-") as tmp:
            yield self.download(Path(tmp) / (self.name or "copy"))

    @contextmanager
    def staged_writes(self) -> Iterator[Path]:
        """A local folder to write many files into (plots, tables) that end up in this folder:
        the folder itself when local, else a temporary folder uploaded on a clean exit."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="linrep-up-") as tmp:
            yield Path(tmp)
            self.upload(tmp)

    # ---- handing it to Ray -----------------------------------------------------------------
    def ray_storage(self) -> dict[str, Any]:
        """RunConfig keywords (Ray Train and Tune) that put a run's folder under this one."""
        if self.is_local:
            return {"storage_path": self.path}
        return {"storage_path": self.path, "storage_filesystem": self.fs}


def _norm(found: str, base: Location) -> str:
    """A path a listing returned, spelled like `base.path` (S3 listings have no leading slash)."""
    return found if base.is_local else _clean(found)


def contained(root: Location, name: str, what: str = "run.name", where: str = "run.storage") -> Location:
    """root/name, refused (UserError) unless it lies strictly inside `root` (same check for local
    folders and URIs: '..' in a name must never put files, or Ray's deletions, outside)."""
    if root.is_local:
        inside = Location(root.fs, str((Path(root.path) / name).resolve()), "")
        raw = Location(root.fs, posixpath.join(root.path, name), "")
    else:
        inside = raw = Location(root.fs, posixpath.join(root.path, name), root.scheme)
    if not root.contains(inside):
        raise UserError(f"{what}={name!r} would put the folder outside {where}={root}; "
                        "use letters, digits and . _ - only")
    return raw if root.is_local else inside
