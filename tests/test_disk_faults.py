"""Disk full and read-only storage while a checkpoint is written, on a real (tiny tmpfs) filesystem.

The promise: the previous complete checkpoint stays the resume point (a cut-short folder has no
meta.json, or files whose sizes differ from what meta.json lists).
The filesystems are real mounts (root and CAP_SYS_ADMIN: CI runs as root); where mounting is
refused the tests skip, saying why. Every mount is unmounted in a finally block.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

MOUNT_SIZE = "4m"


@contextlib.contextmanager
def tiny_fs(where: Path, size: str = MOUNT_SIZE):
    """A tmpfs of `size` mounted at `where` for the duration of the block."""
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {proc.stderr.strip()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where: Path) -> Path:
    """Write a filler file until the filesystem is full; return it."""
    filler = where / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as err:
            assert err.errno == errno.ENOSPC, err
    with open(filler, "ab", buffering=0) as fh:  # the last few bytes too
        try:
            while True:
                fh.write(b"\0" * 512)
        except OSError:
            pass
    return filler


def remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)


def small_checkpoint(folder: Path, step: int, hidden=(64, 64)) -> Path:
    """A real checkpoint written by the trainer's own write_checkpoint (off the tiny filesystem)."""
    import torch

    from trainer.checkpoint import make_meta, write_checkpoint
    from trainer.config import load_config
    from trainer.engine import TorchEngine
    from trainer.models import InputSpec, build_classifier

    cfg = load_config("synthetic-supervised", [f"model.hidden={list(hidden)}", "data.generator_pool=100"])
    model = build_classifier(cfg, InputSpec(dim=5), 100)
    path = folder / f"checkpoint_{step:08d}"
    write_checkpoint(TorchEngine(model, cfg.optim, torch.device("cpu")), cfg, make_meta(step, 0, 100, InputSpec(dim=5)),
                     path)
    return path


def persist(src: Path, run_dir: Path) -> None:
    """What Ray Train does with a reported checkpoint: a pyarrow copy into the run's storage."""
    import pyarrow.fs as pafs

    local = pafs.LocalFileSystem()
    local.create_dir(str(run_dir / src.name), recursive=True)
    pafs.copy_files(str(src), str(run_dir / src.name), source_filesystem=local, destination_filesystem=local)


def resume_step(run_dir: Path) -> int | None:
    from trainer.checkpoint import list_checkpoints, read_meta

    found = list_checkpoints(run_dir)
    return read_meta(found[-1])["step"] if found else None


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_a_checkpoint_cut_short_by_the_disk_leaves_the_previous_one_the_resume_point(fault, tmp_path):
    from trainer.checkpoint import load_classifier, write_checkpoint  # noqa: F401 - the loader is checked below

    staged = tmp_path / "staged"
    first, second = small_checkpoint(staged, 100), small_checkpoint(staged, 200, hidden=(256, 256))
    with tiny_fs(tmp_path / "store") as store:
        run_dir = store / "run"
        persist(first, run_dir)
        assert resume_step(run_dir) == 100
        if fault == "disk full":
            fill(store)
            expected = errno.ENOSPC
        else:
            remount_read_only(store)
            expected = errno.EROFS
        with pytest.raises(OSError) as err:  # Ray's persist of the next checkpoint
            persist(second, run_dir)
        assert err.value.errno == expected or str(os.strerror(expected)) in str(err.value), err.value
        with pytest.raises((OSError, RuntimeError)):  # the trainer's own write (torch.save: RuntimeError)
            small_checkpoint(store / "run", 300)
        assert resume_step(run_dir) == 100  # the cut-short folder is never taken
        model, _, meta = load_classifier(run_dir / first.name)
        assert meta["step"] == 100 and sum(p.numel() for p in model.parameters()) > 0
        if fault == "disk full":  # space comes back: the next checkpoint is complete and taken
            (store / "filler").unlink()
            shutil.rmtree(run_dir / second.name, ignore_errors=True)
            persist(second, run_dir)
            assert resume_step(run_dir) == 200


def test_linrep_train_on_a_disk_that_fills_stops_in_one_line_and_resumes_once_there_is_room(tmp_path, shared_ray):
    """End to end: `linrep train` with run.storage on a real 8 MiB tmpfs, filled by another writer
    after the second checkpoint. The run stops with one line naming the full disk and the resume
    point, no traceback on the console; the MLflow run (on another disk) is FAILED; once the filler
    is gone the same command resumes from that checkpoint and every train step is stored once."""
    import time

    from mlflow.tracking import MlflowClient

    from tests.conftest import LINREP

    steps, every, log = 1000, 100, 50
    args = ["train", "synthetic-supervised", f"optim.steps={steps}", "run.workers=1", f"run.checkpoint_every={every}",
            f"run.log_every={log}", "probe.samples=1024", "data.generator_pool=1000", "model.hidden=[128,128]",
            "optim.warmup_steps=5", "run.max_failures=1", "run.name=full"]
    env = {**os.environ, **shared_ray, "PYTHONUNBUFFERED": "1"}
    with tiny_fs(tmp_path / "store", size="8m") as store:
        run_dir = store / "full"
        proc = subprocess.Popen([*LINREP, *args, f"run.storage={store}"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and (resume_step(run_dir) or 0) < 2 * every:
                time.sleep(0.2)
            filled_at = resume_step(run_dir)
            assert proc.poll() is None and filled_at is not None, "the run ended before its disk could fill"
            fill(store)
            stdout, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
        last = resume_step(run_dir)
        assert proc.returncode == 1, stdout[-2000:] + stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("linrep: error: "), stderr[-3000:]
        assert "No space left on device" in errors[0] and f"step {last}" in errors[0], errors[0]
        # stdout ends with the log's last lines (the worker's traceback among them, by design); the
        # full disk under the log itself must not add logging's own "--- Logging error ---" dumps
        assert "Logging error" not in stdout + stderr and "[linrep] the log's last lines:" in stdout
        assert filled_at <= last < steps
        uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
        assert run.info.status == "FAILED"

        (store / "filler").unlink()
        out = subprocess.run([*LINREP, *args, f"run.storage={store}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert f"resumed from step {last}" in text
    (run,) = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == \
        list(range(log, steps + 1, log))
