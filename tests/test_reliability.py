"""Reliability promises, each shown with a real fault: a worker SIGKILLed mid-run, a probe actor
killed while probing, incomplete checkpoints, retention, corrupt shards, a tracking outage, secrets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import LINREP, run_linrep
from trainer.checkpoint import (list_checkpoints, make_meta, prune_checkpoints, read_meta, write_checkpoint,
                                PRUNED_MARKER)
from trainer.config import load_config
from trainer.engine import TorchEngine
from trainer.models import InputSpec, build_classifier

SMALL = ["probe.samples=1024", "data.generator_pool=500", "model.hidden=[64,64]", "optim.warmup_steps=10"]


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def only_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def ray_train_workers(root_pid: int) -> list[psutil.Process]:
    """Ray Train worker processes started under our own driver (never anyone else's)."""
    out = []
    for child in psutil.Process(root_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


def wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if run_dir.exists() and any(read_meta(p)["step"] >= step for p in list_checkpoints(run_dir)):
            return
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def kill_a_worker_mid_run(args: list[str], cwd: Path, run_dir: Path, after_step: int) -> str:
    proc = subprocess.Popen([*LINREP, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_checkpoint(run_dir, after_step, proc)
        workers = ray_train_workers(proc.pid)
        assert workers, "no Ray Train worker found under the driver"
        os.kill(workers[0].pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    return out


# ---- 1. worker death ------------------------------------------------------------------------
def test_worker_sigkill_restarts_from_last_checkpoint_exactly_once(tmp_path):
    args = ["train", "synthetic-supervised", "optim.steps=600", "run.workers=2", "run.checkpoint_every=100",
            "run.log_every=50", "run.max_failures=2", "run.name=wk", *SMALL]
    log = kill_a_worker_mid_run(args, tmp_path, tmp_path / "ray_results" / "wk", after_step=200)
    assert "resumed from step" in log
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    run = only_run(uri, "synthetic")
    assert run.info.status == "FINISHED"
    assert metric_steps(uri, run.info.run_id, "train/loss") == list(range(50, 601, 50))  # no gaps, no duplicates
    assert metric_steps(uri, run.info.run_id, "probe/r2_affine") == list(range(100, 601, 100))
    assert read_meta(list_checkpoints(tmp_path / "ray_results" / "wk")[-1])["step"] == 600


@pytest.fixture(scope="module")
def dsprites_tiny(tmp_path_factory) -> Path:
    from trainer.data.convert.dsprites import generate_dsprites

    out = tmp_path_factory.mktemp("dsprites_tiny")
    generate_dsprites(out, seed=0, samples_per_shard=400, processes=2, limit=3000, progress=False)
    return out


DS_ARGS = ["optim.batch_size=128", "run.checkpoint_every=20", "run.log_every=10", "probe.max_train_samples=800",
           "probe.max_eval_samples=300", "optim.warmup_steps=2", "data.shuffle_buffer=100", "model.hidden=[64,64,64]",
           "run.stop_at={}"]  # exact step counts are asserted: no early stop


def test_deepspeed_worker_sigkill_restarts_exactly_once(tmp_path, dsprites_tiny):
    args = ["train", "dislib-dsprites-mlp", f"data.root={dsprites_tiny}", "run.workers=2", "optim.steps=60",
            "optim.zero_stage=2", "run.max_failures=2", "run.name=dsk", *DS_ARGS]
    log = kill_a_worker_mid_run(args, tmp_path, tmp_path / "ray_results" / "dsk", after_step=20)
    assert "resumed from step" in log
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    run = only_run(uri, "dislib-dsprites")
    assert metric_steps(uri, run.info.run_id, "train/loss") == list(range(10, 61, 10))
    assert metric_steps(uri, run.info.run_id, "val/acc") == [20, 40, 60]


# ---- 3. probe actor death -------------------------------------------------------------------
def make_checkpoint(cfg, path: Path, step: int) -> Path:
    torch.manual_seed(0)
    model = build_classifier(cfg, InputSpec(dim=cfg.data.dim), cfg.data.num_classes)
    write_checkpoint(TorchEngine(model, cfg.optim, torch.device("cpu")), cfg, make_meta(step, 0, 100, InputSpec(dim=5)),
                     path)
    return path


def wait_for_attempt(run_dir: Path, step: int, attempt: int, timeout: float = 120) -> dict:
    """The attempts ledger's entry once `step`'s probe has started its `attempt`-th try (the actor
    writes it before probing): proof that the probe is running, and in which process."""
    from probes.attempts import read_ledger

    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = read_ledger(run_dir).get(step, {})
        if entry.get("attempts", 0) >= attempt and entry.get("state") == "probing":
            return entry
        time.sleep(0.05)
    raise AssertionError(f"the probe of step {step} did not start attempt {attempt} within {timeout} s")


def test_probe_actor_killed_while_probing_reprobes(tmp_path, ray_local, sqlite_uri):
    from probes.actor import start_probe_actor
    from probes.attempts import read_ledger
    from trainer.tracking import open_run

    cfg = load_config("synthetic-supervised", ["data.generator_pool=200", "probe.samples=60000"])
    run_id = open_run(cfg, sqlite_uri, "probe-kill")
    ckpt = make_checkpoint(cfg, tmp_path / "run" / "checkpoint_00000100", 100)
    actor = start_probe_actor(sqlite_uri, run_id, cfg)
    first_pid = ray_local.get(actor.pid.remote())
    ref = actor.probe.remote(str(ckpt), 100)
    started = wait_for_attempt(tmp_path / "run", 100, 1)  # inside the probe: its first attempt is under way
    assert started["pid"] == first_pid
    os.kill(first_pid, signal.SIGKILL)
    figures = ray_local.get(ref, timeout=300)
    second_pid = ray_local.get(actor.pid.remote())
    assert second_pid != first_pid  # a restarted actor did it
    # the kill landed mid-probe: a second attempt, by the new process, finished it (had the first
    # attempt finished before the kill, the ledger would say 1)
    assert read_ledger(tmp_path / "run")[100] == {"attempts": 2, "state": "done", "pid": second_pid}
    assert 0 <= figures["probe/r2_g"] <= 1
    for key in ("probe/r2_affine", "probe/seconds"):
        assert metric_steps(sqlite_uri, run_id, key) == [100]  # the step's figures exist exactly once
    # a probe that fails (a broken checkpoint) is reported, never raised into training
    assert ray_local.get(actor.probe.remote(str(tmp_path / "missing"), 200)) == {}
    ray_local.kill(actor)


# ---- 4. storage -----------------------------------------------------------------------------
def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    import ray.train  # noqa: F401  (restore falls back to Ray's checkpoint only when none is complete)
    from trainer.loop import restore

    cfg = load_config("synthetic-supervised", ["model.hidden=[8]"])
    run = tmp_path / "run"
    make_checkpoint(cfg, run / "checkpoint_00000100", 100)
    truncated = make_checkpoint(cfg, run / "checkpoint_00000200", 200)
    data = (truncated / "model.pt").read_bytes()
    (truncated / "model.pt").write_bytes(data[: len(data) // 2])  # a crash while persisting
    no_meta = make_checkpoint(cfg, run / "checkpoint_00000300", 300)
    (no_meta / "meta.json").unlink()  # a crash before meta.json (written last)
    assert [read_meta(p)["step"] for p in list_checkpoints(run)] == [100]
    model = build_classifier(cfg, InputSpec(dim=5), 100)
    assert restore(TorchEngine(model, cfg.optim, torch.device("cpu")), run) == 100


def test_retention_keeps_last_k_and_the_best(tmp_path):
    cfg = load_config("synthetic-supervised", ["model.hidden=[8]"])
    run = tmp_path / "run"
    for step in range(100, 701, 100):
        make_checkpoint(cfg, run / f"checkpoint_{step:08d}", step)
    pruned = prune_checkpoints(run, keep_last=2, best_step=300)
    assert pruned == [100, 200, 400, 500]
    assert [read_meta(p)["step"] for p in list_checkpoints(run)] == [300, 600, 700]
    assert (run / "checkpoint_00000100" / PRUNED_MARKER).exists()  # the folder stays for Ray's snapshot
    assert not (run / "checkpoint_00000100" / "model.pt").exists()


# ---- 5. corrupt data ------------------------------------------------------------------------
def _copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".verified.json"))
    return dst


def _rewrite_manifest_sha(root: Path, shard: str) -> None:
    from trainer.data.shards import file_sha256

    manifest = json.loads((root / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for info in split["shards"]:
            if info["name"] == shard:
                info["sha256"] = file_sha256(root / shard)
    (root / "manifest.json").write_text(json.dumps(manifest))


def _corrupt_one_png(root: Path, shard: str) -> str:
    """Replace one sample's PNG with garbage (a valid tar, an undecodable image); return its key."""
    from tests.fabricate import damage_one_image

    return damage_one_image(root / shard, "png", lambda data: b"not a png at all" * 4)


def test_sha256_mismatch_stops_or_is_skipped(tmp_path, dsprites_tiny, shared_ray):
    root = _copy_dataset(dsprites_tiny, tmp_path / "ds")
    shard = root / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    base = ["train", "dislib-dsprites-mlp", f"data.root={root}", "optim.steps=10", *DS_ARGS, "run.checkpoint_every=10"]
    stopped = run_linrep(base, cwd=tmp_path, timeout=300)
    assert stopped.returncode == 2  # bad input, met at preflight
    err = [l for l in stopped.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and "train-000001.tar" in err[0] and "sha256" in err[0]
    assert not (tmp_path / "ray_results").exists()  # stopped before any training
    skipped = run_linrep([*base, "data.on_error=skip"], cwd=tmp_path, env=shared_ray, timeout=600)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    run = only_run(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "dislib-dsprites")
    assert run.data.metrics["data/skipped"] == 400


def test_undecodable_image_stops_naming_shard_and_sample_or_is_counted(tmp_path, dsprites_tiny, shared_ray):
    root = _copy_dataset(dsprites_tiny, tmp_path / "ds")
    key = _corrupt_one_png(root, "train-000000.tar")
    _rewrite_manifest_sha(root, "train-000000.tar")
    base = ["train", "dislib-dsprites-mlp", f"data.root={root}", "optim.steps=20", "run.workers=1",
            "run.max_failures=0", "data.loader_workers=0", *DS_ARGS]
    stopped = run_linrep(base, cwd=tmp_path, env=shared_ray, timeout=600)
    assert stopped.returncode == 1
    line = stopped.stderr.strip().splitlines()[-1]
    assert "train-000000.tar" in line and key in line, stopped.stderr[-2000:]
    counted = run_linrep([*base, "data.on_error=skip", "run.name=skip"], cwd=tmp_path, env=shared_ray,
                         timeout=600)
    assert counted.returncode == 0, counted.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dislib-dsprites").experiment_id],
                              filter_string="tags.`linrep.run_key` = 'skip'")
    assert runs[0].data.metrics["data/skipped"] >= 1


# ---- 6. tracking outage -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(tmp_path: Path, port: int, timeout: float = 120) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
           str(tmp_path / "server-artifacts"), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start")


def test_tracking_server_unreachable_at_start_is_one_line(tmp_path):
    port = free_port()
    out = run_linrep(["train", "synthetic-supervised", f"tracking.uri=http://127.0.0.1:{port}"], cwd=tmp_path,
                     timeout=120)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "unreachable" in lines[0] and str(port) in lines[0]
    assert not (tmp_path / "ray_results").exists()


def test_tracking_server_lost_mid_run_training_finishes_and_warns(tmp_path, shared_ray):
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    args = ["train", "synthetic-supervised", "optim.steps=800", "run.checkpoint_every=100", "run.log_every=20",
            f"tracking.uri=http://127.0.0.1:{port}", "run.name=outage", "tracking.outage_wait_s=5", *SMALL]
    proc = subprocess.Popen([*LINREP, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, **shared_ray})
    try:
        wait_for_checkpoint(tmp_path / "ray_results" / "outage", 100, proc)
        os.killpg(server.pid, signal.SIGKILL)  # the server goes away and never returns
        out, _ = proc.communicate(timeout=900)
    finally:
        for p in (proc, server):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert read_meta(list_checkpoints(tmp_path / "ray_results" / "outage")[-1])["step"] == 800
    assert "MLflow write failed" in out and "could not be written" in out and "dropped" in out


# ---- 8. security ------------------------------------------------------------------------------
def test_secrets_never_reach_params_tags_logs_or_artifacts(tmp_path):
    token = "fake-token-5f3c9a1e77"
    env = {"MLFLOW_TRACKING_TOKEN": token, "AWS_SECRET_ACCESS_KEY": token + "-aws", "RAY_AUTH_TOKEN": token + "-ray"}
    out = run_linrep(["train", "synthetic-supervised", "optim.steps=100", "run.checkpoint_every=50", *SMALL],
                     cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert token not in out.stdout + out.stderr
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    run = only_run(uri, "synthetic")
    texts = list(run.data.params.values()) + list(run.data.tags.values())
    assert not any(token in str(t) for t in texts)
    for path in (tmp_path / "mlruns").rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    for path in (tmp_path / "ray_results").rglob("*.yaml"):
        assert token not in path.read_text()
