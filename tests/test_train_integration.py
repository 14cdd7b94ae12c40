"""Integration: the real CLI trains through Ray Train with 2 workers, is killed after a checkpoint,
resumes from it when rerun, and leaves train and probe metrics at the right steps, each once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.local.clusterlib import LOOPBACK, listeners
from tests.conftest import LINREP
from trainer.checkpoint import list_checkpoints, read_meta

STEPS, EVERY, LOG = 400, 100, 50
ARGS = ["train", "synthetic-supervised", f"optim.steps={STEPS}", "run.workers=2", f"run.checkpoint_every={EVERY}",
        f"run.log_every={LOG}", "probe.samples=1024", "data.generator_pool=1000", "model.hidden=[64,64]",
        "optim.warmup_steps=10", "run.name=itest"]


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_two_workers_killed_resumed_metrics_exactly_once(tmp_path, shared_ray):
    """Also: while 2 workers train, the local run listens on 127.0.0.1 only."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "ray_results" / "itest"
    # 1. start, wait for the second checkpoint, then kill the driver (and its local Ray) with SIGKILL
    proc = subprocess.Popen([*LINREP, *ARGS], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, sockets = time.time() + 400, []
    try:
        while time.time() < deadline and proc.poll() is None:
            done = [read_meta(p)["step"] for p in list_checkpoints(run_dir)] if run_dir.exists() else []
            if done and not sockets:  # training with 2 workers: the local Ray's socket table now
                sockets = listeners([proc.pid])
            if any(s >= 2 * EVERY for s in done):
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        # every socket of the run on loopback: driver, GCS, raylet, agents, both workers, the probe
        # actor, gloo's pairs, and torch's TCPStore (the process group's rendezvous, in rank 0),
        # which trainer.ray_private's backend serves on a socket bound to MASTER_ADDR (RELIABILITY.md)
        assert len(sockets) >= 5, sockets
        assert all(row[0] in LOOPBACK for row in sockets), sockets
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = max(read_meta(p)["step"] for p in list_checkpoints(run_dir))
    assert EVERY * 2 <= killed_at < STEPS
    time.sleep(3)  # let the killed Ray's processes go

    # 2. the same command resumes and finishes; it joins the session's Ray (conftest.shared_ray: the
    # resume point is the run folder and the MLflow store, not the Ray it ran on) instead of starting
    # another local Ray (a start: 3-14 s on 2 cores, by load)
    out = subprocess.run([*LINREP, *ARGS], cwd=tmp_path, env={**env, **shared_ray}, capture_output=True, text=True,
                         timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "resumed from step" in log
    resumed = int(log.split("resumed from step")[1].split()[0])
    assert resumed >= killed_at

    # 3. MLflow: one run, every train step and every checkpoint's probe exactly once
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("synthetic")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert metric_steps(uri, run_id, "train/loss") == list(range(LOG, STEPS + 1, LOG))
    assert metric_steps(uri, run_id, "train/samples_per_s") == list(range(LOG, STEPS + 1, LOG))
    for key in ("probe/r2_affine", "probe/r2_w", "probe/sv_mae", "probe/r2_g"):
        assert metric_steps(uri, run_id, key) == list(range(EVERY, STEPS + 1, EVERY)), key
    params = runs[0].data.params
    assert params["run.workers"] == "2" and params["data.kappa"] == "10.0"
    assert [read_meta(p)["step"] for p in list_checkpoints(run_dir)][-1] == STEPS
    assert "final probe figures" in log and run_id in log


def test_stop_at_ends_two_workers_together_after_the_probe_reaches_it(tmp_path, shared_ray):
    """run.stop_at (the paper's 'stop once validation accuracy > 0.999'): rank 0 sees the probe's
    figures and both DDP ranks leave the loop at the same checkpoint; the cap is never reached."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_linrep

    args = ["train", "synthetic-supervised", "optim.steps=3000", "run.workers=2", "run.checkpoint_every=25",
            "run.log_every=25", "probe.samples=1024", "data.generator_pool=1000", "model.hidden=[64,64]",
            "optim.warmup_steps=10", "run.name=stopper", "run.stop_at={probe/r2_affine: 0.6}"]
    out = run_linrep(args, cwd=tmp_path, env=shared_ray, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "reached probe/r2_affine" in log and "(run.stop_at)" in log
    steps = [read_meta(p)["step"] for p in list_checkpoints(tmp_path / "ray_results" / "stopper")]
    last = max(steps)
    assert last < 3000 and last % 25 == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])[0]
    assert run.info.status == "FINISHED"
    (reached_step,) = [int(m.value) for m in client.get_metric_history(run.info.run_id, "train/stop_reached_step")]
    r2 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "probe/r2_affine")}
    assert r2[reached_step] >= 0.6 and reached_step < last


def _train_controller(root_pid: int):
    """The Ray Train controller actor among the processes of this run's tree (the run's own Ray)."""
    from infra.local.clusterlib import process_tree

    for proc in process_tree(root_pid):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::TrainController"):
                return proc
        except Exception:  # a process that ended meanwhile
            continue
    return None


def _kill_run_tree(root_pid: int) -> None:
    """SIGKILL the run's driver and every process of its tree, by pid, and wait until all are gone.
    Ray's workers and its Train controller each sit in a process group of their own, so killing the
    driver's group alone leaves them to notice their raylet's death a moment later."""
    import psutil

    from infra.local.clusterlib import process_tree

    def gone(p: psutil.Process) -> bool:  # a zombie writes nothing more
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    tree = [p for p in process_tree(root_pid) if p.pid != root_pid]  # the driver: Popen reaps it
    os.killpg(root_pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 60
    while not all(gone(p) for p in tree):
        assert time.monotonic() < deadline, [p for p in tree if not gone(p)]
        time.sleep(0.1)


def _recorded_steps(run_dir: Path) -> list[int]:
    """The checkpoint steps Ray Train's controller has recorded (its snapshot in the run folder)."""
    import json

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
    return [int(r["checkpoint_dir_name"].rsplit("_", 1)[1]) for r in results]


def test_a_checkpoint_persisted_but_never_recorded_by_the_controller_is_the_resume_point(tmp_path, shared_ray):
    """The window between a worker persisting a checkpoint and Ray Train's controller recording it,
    held open on purpose: the controller is frozen (SIGSTOP) after the first checkpoint, so the
    worker persists the next ones (up to two: its report queue holds one) that no snapshot lists,
    then everything is SIGKILLed. The rerun resumes from the newest persisted checkpoint, not the
    newest recorded one, and every train step and probe is stored once."""
    steps, every, log = 200, 20, 10
    args = ["train", "synthetic-supervised", f"optim.steps={steps}", "run.workers=1", f"run.checkpoint_every={every}",
            f"run.log_every={log}", "probe.samples=1024", "data.generator_pool=1000", "model.hidden=[32,32]",
            "optim.warmup_steps=5", "run.name=window", "run.in_process=false"]  # the Train controller is the point
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "ray_results" / "window"
    proc = subprocess.Popen([*LINREP, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, controller, seen, grew_at = time.time() + 300, None, [], time.time()
        while time.time() < deadline and proc.poll() is None:
            persisted = [read_meta(p)["step"] for p in list_checkpoints(run_dir)] if run_dir.exists() else []
            if persisted != seen:
                seen, grew_at = persisted, time.time()
            if controller is None and persisted:
                controller = _train_controller(proc.pid)
                assert controller is not None, "no ray::TrainController in the run's process tree"
                controller.suspend()  # SIGSTOP: it records nothing from now on
                frozen_at = max(persisted)
            elif controller is not None and max(persisted) >= frozen_at + every:
                time.sleep(2)  # the worker may persist one more before its report queue blocks it
                break
            elif controller is not None and time.time() - grew_at > 10:
                # the worker persisted its last ones before the freeze was seen (two checkpoints can
                # land within one poll) and now waits on its full report queue: nothing more comes
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        _kill_run_tree(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    # listed only once every process of the run is gone: a worker outliving the kill of the driver's
    # process group persisted one more checkpoint after this listing once (load average 15)
    persisted = [read_meta(p)["step"] for p in list_checkpoints(run_dir)]
    recorded = _recorded_steps(run_dir)
    assert max(persisted) > max(recorded, default=0), (persisted, recorded)  # the window was open
    assert max(persisted) < steps
    time.sleep(3)  # let the killed Ray's processes go

    # the rerun joins the session's Ray (conftest.shared_ray) instead of starting its own (3-14 s on
    # 2 cores, by load): only the frozen run had to own the Ray it killed
    out = subprocess.run([*LINREP, *args], cwd=tmp_path, env={**env, **shared_ray}, capture_output=True, text=True,
                         timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert f"resumed from step {max(persisted)}" in text, text[-3000:]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("synthetic").experiment_id])
    assert run.info.status == "FINISHED"
    assert metric_steps(uri, run.info.run_id, "train/loss") == list(range(log, steps + 1, log))
    assert metric_steps(uri, run.info.run_id, "probe/r2_affine") == list(range(every, steps + 1, every))
