"""Tracking outages and MetricLogger: exactly once across a restart during an outage, and a hung
(not refused) server never stalls a training step. A real `mlflow server` (SIGKILLed and started
again on the same port and database), and a real socket that accepts connections and never answers."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.test_reliability import free_port, metric_steps, start_mlflow_server
from trainer import tracking
from trainer.tracking import FAST_FAIL_ENV, MetricLogger


@pytest.fixture
def fast_fail(monkeypatch):
    for key, value in FAST_FAIL_ENV.items():  # what every linrep process runs with
        monkeypatch.setenv(key, value)


def test_a_restart_during_an_outage_logs_every_step_exactly_once(tmp_path, fast_fail, capfd):
    """A worker restarted while the store is away replays a step; the run then ends before the store
    is back (found on the test bed: a 57 s restart, and the logger gave up 30 s after training):
    close(retries=None) waits it out within close_timeout_s (tracking.outage_wait_s), and every
    step is stored exactly once."""
    import threading

    store = f"sqlite:///{tmp_path / 'server.db'}"  # the database the server will serve
    run_id = tracking.create_run(store, tracking.ensure_experiment(store, "outage"), "outage")
    first = MetricLogger(store, run_id)            # the run before its worker died: steps 10..30 stored
    for step in (10, 20, 30):
        first.log({"train/loss": step / 10}, step)
    first.close()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"               # the server is away: nothing listens there yet
    second = MetricLogger(uri, run_id, close_timeout_s=400)  # the restarted worker, resumed from step 20
    second.resume_from(["train/loss"])             # cannot read what is stored: the key stays unresolved
    assert second.unresolved == {"train/loss"}
    for step in (30, 40):                          # a replay of step 30, then a new step
        second.log({"train/loss": step / 10}, step)
    assert second.flush(force=True) is False       # still away: kept
    servers = []                                   # back (same database) while close() waits
    restart = threading.Thread(target=lambda: servers.append(start_mlflow_server(tmp_path, port, timeout=380)))
    restart.start()
    try:
        second.close(retries=None, wait_s=1.0)
        restart.join()
        assert metric_steps(uri, run_id, "train/loss") == [10, 20, 30, 40]
        assert "could not be written" not in capfd.readouterr().err
    finally:
        restart.join()
        for server in servers:
            os.killpg(server.pid, signal.SIGKILL)


def test_a_hung_server_never_stalls_a_training_step(fast_fail, capfd):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # the kernel accepts connections; nobody ever answers
    uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
    try:
        logger = MetricLogger(uri, "0" * 32, flush_every_s=0, background=True, flush_wait_s=0.5, close_timeout_s=3)
        steps, flushes = [], []
        for step in range(1, 301):                 # what train() does: log every step, flush at checkpoints
            t0 = time.perf_counter()
            logger.log({"train/loss": 1.0, "train/acc": 0.5}, step)
            steps.append(time.perf_counter() - t0)
            if step % 50 == 0:
                t0 = time.perf_counter()
                assert logger.flush() is False
                flushes.append(time.perf_counter() - t0)
        assert max(steps) < 0.1, max(steps)        # a blocking write would take MLFLOW_HTTP_REQUEST_TIMEOUT (10 s)
        assert max(flushes) < 1.5, flushes         # bounded by flush_wait_s, then not at all (the write is stuck)
        t0 = time.perf_counter()
        logger.close(retries=1, wait_s=0)
        assert time.perf_counter() - t0 < 5       # bounded by close_timeout_s
    finally:
        hung.close()
    assert "600 metric values could not be written" in capfd.readouterr().err
