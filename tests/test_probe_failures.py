"""A probe that kills its actor every time is given probe.max_attempts tries, recorded as failed,
and the run goes on and finishes; the drain at the end of a run is bounded. Real Ray, a real probe
actor, a real sqlite MLflow store; the actor process is SIGKILLed by its pid, which the attempts
ledger (probes/attempts.py) names, and only when it is a descendant of our own driver."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from probes.attempts import read_ledger
from tests.conftest import LINREP
from tests.test_reliability import SMALL, make_checkpoint, metric_steps, only_run
from trainer.config import load_config
from trainer.storage import locate


def kill_every_attempt(run_dir: Path, step: int, attempts: int, driver: int, stop: threading.Event) -> list[int]:
    """SIGKILL the process probing `step` each time it starts an attempt (its pid from the ledger,
    which the actor writes before it probes): a checkpoint whose probe always crashes its actor."""
    killed: list[int] = []
    while not stop.is_set() and len(killed) < attempts:
        entry = read_ledger(run_dir).get(step, {})
        pid = entry.get("pid")
        if entry.get("state") == "probing" and entry.get("attempts") == len(killed) + 1 and pid not in killed:
            ours = {p.pid for p in psutil.Process(driver).children(recursive=True)}
            assert pid in ours, f"pid {pid} is not under our driver"
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.02)
    return killed


def test_a_probe_that_always_kills_its_actor_is_recorded_and_the_run_finishes(tmp_path):
    args = ["train", "synthetic-supervised", "optim.steps=200", "run.checkpoint_every=100", "run.log_every=50",
            "run.name=crash", "probe.max_attempts=2", *SMALL, "probe.samples=60000",
            "run.in_process=false"]  # the probe actor is what gets killed: not a thread of the CLI
    run_dir = tmp_path / "ray_results" / "crash"
    proc = subprocess.Popen([*LINREP, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    stop = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(target=lambda: killed.extend(kill_every_attempt(run_dir, 100, 2, proc.pid, stop)))
    killer.start()
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        stop.set()
        killer.join()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert len(killed) == 2 and killed[0] != killed[1], out[-3000:]  # two attempts, two processes, killed mid-probe
    ledger = read_ledger(run_dir)
    assert ledger[100]["state"] == "failed" and ledger[100]["attempts"] == 2
    assert ledger.get(200, {}).get("state") == "done", (ledger, out[-3000:])
    assert "warning: probe of step 100" in out and "probe.max_attempts" in out  # the run's log says so
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    run = only_run(uri, "synthetic")
    assert run.info.status == "FINISHED"
    assert "probe.max_attempts" in run.data.tags["linrep.probe_failed.100"]
    assert not any(k.startswith("linrep.probe_failed.") and k != "linrep.probe_failed.100" for k in run.data.tags)
    assert metric_steps(uri, run.info.run_id, "probe/r2_affine") == [200]  # the next checkpoint probed, once


def probes_of_two_checkpoints(tmp_path, sqlite_uri, where: str, name: str, *overrides: str):
    """A run with checkpoints at steps 100 and 200 (none submitted yet) and its probes: the probe
    actor, or a thread of this process (probes.actor.LocalProbe)."""
    from probes.actor import ActorProbes, LocalProbe, start_probe_actor
    from trainer.tracking import open_run

    cfg = load_config("synthetic-supervised", ["data.generator_pool=200", "run.checkpoint_every=100",
                                               "optim.steps=200", *overrides])
    run_id = open_run(cfg, sqlite_uri, name)
    run_dir = tmp_path / "run"
    for step in (100, 200):
        make_checkpoint(cfg, run_dir / f"checkpoint_{step:08d}", step)
    probes = (ActorProbes(start_probe_actor(sqlite_uri, run_id, cfg)) if where == "actor"
              else LocalProbe(sqlite_uri, run_id, cfg))
    return cfg, run_id, run_dir, probes


@pytest.mark.parametrize("where", ["actor", "thread"])
def test_the_drain_is_bounded_and_names_what_was_not_probed(tmp_path, ray_local, sqlite_uri, capfd, where):
    """Both kinds of probes (a probe actor; a thread of the training process, probes.actor.LocalProbe)
    end their drain at probe.drain_timeout_s with one warning line naming the steps not probed."""
    from probes.pipeline import drain_probes
    from trainer.run import RunHandle

    cfg, run_id, run_dir, probes = probes_of_two_checkpoints(tmp_path, sqlite_uri, where, "drain",
                                                             "probe.samples=300000", "probe.drain_timeout_s=1")
    for step in (100, 200):
        probes.submit(str(run_dir / f"checkpoint_{step:08d}"), step)
    t0 = time.perf_counter()
    history = drain_probes(probes, RunHandle(cfg, "drain", locate(run_dir), sqlite_uri, run_id))
    waited = time.perf_counter() - t0
    probes.close()
    assert history == {} and waited < 10
    lines = [l for l in capfd.readouterr().err.splitlines() if "checkpoints not probed" in l]
    assert len(lines) == 1 and "probe.drain_timeout_s=1" in lines[0] and "steps 100, 200" in lines[0], lines


@pytest.mark.parametrize("where", ["actor", "thread"])
def test_wait_returns_once_the_checkpoint_submitted_before_it_is_probed(tmp_path, ray_local, sqlite_uri, where):
    """run.stop_wait's wait, on both kinds of probes: the figures of the checkpoint submitted just
    before (calls are answered in order); at once, with the figures known so far, when stopping."""
    _, _, run_dir, probes = probes_of_two_checkpoints(tmp_path, sqlite_uri, where, "wait", "probe.samples=2048")
    try:
        probes.submit(str(run_dir / "checkpoint_00000100"), 100)
        first = probes.wait(300)
        assert first["step"] == 100 and -1 <= first["probe/r2_affine"] <= 1
        probes.submit(str(run_dir / "checkpoint_00000200"), 200)
        t0 = time.perf_counter()
        assert probes.wait(300, stopping=lambda: True)["step"] in (100, 200) and time.perf_counter() - t0 < 2
        assert probes.wait(300)["step"] == 200
    finally:
        probes.close()
