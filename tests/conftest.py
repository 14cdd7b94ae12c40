"""Shared fixtures: a real local Ray, a real sqlite MLflow store, the repo's shared fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LINREP = [sys.executable, "-m", "linrep"]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("PYTHONUNBUFFERED", "1")


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray runtime with this machine's 2 CPUs (module-scoped: started once per file)."""
    import ray

    from trainer.ray_private import use_single_machine_mode

    if not ray.is_initialized():
        use_single_machine_mode()  # as a local `linrep train`: every socket on 127.0.0.1
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 configure_logging=True, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


# A Ray head that outlives every test of the session, for CLI subprocesses that join it through
# RAY_ADDRESS instead of starting their own local Ray (about 14 s per start on a 2-core AMD EPYC,
# measured; 20 tests, with some 30 CLI runs, join it). A holder process ray.init()s a local Ray as
# `linrep train` does (trainer.run.init_ray: single-machine mode, every socket on 127.0.0.1), prints its GCS
# address, and shuts Ray down when its stdin closes: when the session ends, or when pytest dies.
# Only for tests that neither kill Ray's processes nor inspect their own Ray's sockets, and whose
# Ray workers need no environment variable that only the subprocess has (a shared raylet starts
# workers with the session's environment, as a real cluster's does).
RAY_HOLDER = """
import os
import sys
import ray
from trainer.ray_private import use_single_machine_mode
use_single_machine_mode()
ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
               _node_ip_address="127.0.0.1", log_to_driver=False)  # each joining driver gets its own logs
print(ctx.address_info["gcs_address"], os.environ.get("RAY_AUTH_MODE", "disabled"), flush=True)
sys.stdin.read()
ray.shutdown()
"""


@contextlib.contextmanager
def ray_holder():
    """A local Ray in a holder process (RAY_HOLDER) started with this process's environment now;
    yields the environment a CLI subprocess needs to join it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    holder = subprocess.Popen([sys.executable, "-c", RAY_HOLDER], cwd=REPO, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = holder.stdout.readline().split()
        if len(line) != 2:
            pytest.fail(f"the holder's Ray did not start (exit {holder.wait(timeout=60)})")
        address, auth_mode = line
        # the joining driver must resolve its own address to 127.0.0.1, as the head did; and a new
        # local Ray turns token auth on (token in ~/.ray/auth_token), which Ray enables for a driver
        # given an explicit address only when RAY_AUTH_MODE says so
        yield {"RAY_ADDRESS": address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": auth_mode}
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()


@pytest.fixture(scope="session")
def shared_ray() -> dict[str, str]:
    """Environment for a CLI subprocess that joins the session's Ray (see RAY_HOLDER)."""
    with ray_holder() as env:
        yield env


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def run_linrep(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (its own Ray unless env holds shared_ray's address; its own
    stores under cwd)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*LINREP, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


SUBPROCESS_TIMEOUT_S = 600
"""Default limit of one CLI subprocess in a test: well under pytest's global timeout (1800 s in
pyproject.toml), so a hung command fails its test with a message instead of killing the session."""


def run_cli(args: list[str], cwd: Path, env: dict | None = None,
            timeout: float = SUBPROCESS_TIMEOUT_S) -> subprocess.CompletedProcess:
    """run_linrep in a session of its own: on a timeout the whole process group (the CLI and the
    Ray processes it started) is SIGKILLed before the test fails, so nothing is left running."""
    import signal

    full_env = {**os.environ, **(env or {})}
    proc = subprocess.Popen([*LINREP, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"linrep {' '.join(args)} ran past {timeout:.0f} s; its process group was killed\n"
                    f"{(err or '')[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
