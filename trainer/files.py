"""Atomic, durable file writes: the one helper every room uses.

A reader (a probe actor, a resumed sweep, a second driver) sees either the old file or the whole
new one, never a half-written one, and a power cut after the call returns does not lose it: the
bytes go to a temporary file in the same folder (a rename is only atomic within one filesystem),
which is fsynced, renamed over the target, and then the folder itself is fsynced so that the
rename is on disk too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename + fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid in the temp name: two processes writing the same file never share a temp file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path | str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, obj: Any, *, sort_keys: bool = True) -> None:
    """JSON (indented, trailing newline) written atomically; non-JSON values via str()."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def write_with_atomic(path: Path | str, write) -> None:
    """Atomic write of a file produced by `write(tmp_path)` (a figure, an .npy, a tar).

    The temporary name ends in `.tmp`, so `write` names the format itself
    (`fig.savefig(tmp, format="png")`, `np.save(open(tmp, "wb"), a)`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path | str) -> None:
    """fsync a folder so that a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (e.g. some FUSE/NFS mounts) refuse fsync on a folder
        pass
    finally:
        os.close(fd)
