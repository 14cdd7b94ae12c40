"""`linrep submit` / `linrep jobs`: addresses, tokens, entrypoints and uploads (fast), then end to
end against a real Ray head + MLflow server started by infra/local/cluster.sh (Jobs API over HTTP,
MLflow over HTTP, no mocks)."""

from __future__ import annotations

import argparse
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from infra.local.clusterlib import LOOPBACK, LocalCluster, free_ports, listeners
from linrep import submit as sb
from tests.conftest import LINREP, REPO
from trainer.errors import UserError


# ---- addresses and tokens ------------------------------------------------------------------
def test_address_precedence_and_normalisation():
    env = {"RAY_API_SERVER_ADDRESS": "http://head:8265", "RAY_ADDRESS": "http://other:8265"}
    assert sb.resolve_address("10.0.0.5:8265", env) == ("http://10.0.0.5:8265", "--address")
    assert sb.resolve_address(None, env) == ("http://head:8265", "RAY_API_SERVER_ADDRESS")
    assert sb.resolve_address(None, {"RAY_ADDRESS": "https://ray.example/"}) == ("https://ray.example", "RAY_ADDRESS")
    # a GCS address in RAY_ADDRESS is for ray.init, not the Jobs API: fall back to the default
    assert sb.resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"}) == (sb.DEFAULT_ADDRESS, "the default")


@pytest.mark.parametrize("bad", ["ray://head:10001", "auto", "ftp://head:21", "http://head:notaport"])
def test_bad_addresses_are_one_line_user_errors(bad):
    with pytest.raises(UserError) as err:
        sb.resolve_address(bad, {})
    assert "\n" not in str(err.value) and bad.split(":")[0] in str(err.value)


def test_token_sources_in_order(tmp_path):
    explicit, env_path, local = tmp_path / "explicit", tmp_path / "env", tmp_path / "cluster" / "auth_token"
    local.parent.mkdir()
    for f, text in ((explicit, "t-explicit\n"), (env_path, "t-env-path"), (local, "t-local")):
        f.write_text(text)
    env = {"RAY_AUTH_TOKEN_PATH": str(env_path), "LINREP_CLUSTER_DIR": str(local.parent)}
    assert sb.find_token(str(explicit), True, env) == ("t-explicit", "--token-file")
    assert sb.find_token(None, True, {**env, "RAY_AUTH_TOKEN": "t-env"}) == ("t-env", "RAY_AUTH_TOKEN")
    assert sb.find_token(None, True, env)[0] == "t-env-path"
    only_cluster = {"LINREP_CLUSTER_DIR": str(local.parent)}
    assert sb.find_token(None, True, only_cluster) == ("t-local", str(local))
    # the local cluster's token is never sent to a remote address
    assert sb.find_token(None, False, only_cluster)[0] != "t-local"
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        sb.find_token(str(tmp_path / "empty"), True, {})
    with pytest.raises(UserError, match="cannot be read"):
        sb.find_token(str(tmp_path / "missing"), True, {})


class _Answer(http.server.BaseHTTPRequestHandler):
    """A real HTTP server that is not a Ray dashboard: fixed status and body."""

    status, body = 404, b"not found"

    def do_GET(self):  # noqa: N802
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_answer():
    servers = []

    def start(status: int, body: bytes) -> str:
        handler = type("H", (_Answer,), {"status": status, "body": body})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("status,body,expect", [
    (404, b"nope", "is not a Ray dashboard"),
    (200, b"<html>mlflow</html>", "is not a Ray dashboard"),
    (401, b"Unauthorized", "needs a token"),
    (403, b"Forbidden", "rejected the token from --token-file"),
])
def test_probe_turns_http_answers_into_one_line(http_answer, status, body, expect):
    url = http_answer(status, body)
    target = sb.ClusterTarget(url, "--address", {"Authorization": "Bearer x"}, "--token-file")
    with pytest.raises(UserError) as err:
        sb.probe_jobs_api(target, env={})
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_probe_accepts_a_ray_version_answer(http_answer):
    url = http_answer(200, b'{"ray_version": "2.60.0", "version": "4"}')
    assert sb.probe_jobs_api(sb.ClusterTarget(url, "--address"), env={}) == "2.60.0"


def test_unreachable_default_address_hints_at_cluster_sh():
    (port,) = free_ports(1)
    target = sb.ClusterTarget(f"http://127.0.0.1:{port}", "the default")
    with pytest.raises(UserError) as err:
        sb.probe_jobs_api(target, env={"RAY_ADDRESS": "10.1.2.3:6379"})
    msg = str(err.value)
    assert "connection refused" in msg and "cluster.sh up" in msg and "RAY_ADDRESS=10.1.2.3:6379" in msg


def test_cli_unreachable_address_is_one_line_exit_2(tmp_path):
    (port,) = free_ports(1)
    out = subprocess.run([*LINREP, "submit", "--address", f"http://127.0.0.1:{port}", "train",
                          "synthetic-supervised"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "connection refused" in lines[0]
    jobs = subprocess.run([*LINREP, "jobs", "list", "--address", f"127.0.0.1:{port}"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert jobs.returncode == 2 and len(jobs.stderr.strip().splitlines()) == 1


# ---- what is submitted ---------------------------------------------------------------------
def test_submission_ids_are_sortable_seeded_and_unique():
    a = sb.new_submission_id(seed=7, now=1_800_000_000)
    assert a == sb.new_submission_id(seed=7, now=1_800_000_000)
    assert a != sb.new_submission_id(seed=8, now=1_800_000_000)
    assert re.fullmatch(r"linrep-\d{8}-\d{6}-[0-9a-f]{6}", a)
    assert len({sb.new_submission_id() for _ in range(50)}) == 50


def test_command_checks():
    assert sb.check_command(["--", "train", "x"]) == ["train", "x"]
    for bad in ([], ["--"], ["submit", "train"], ["jobs", "list"], ["ui"]):
        with pytest.raises(UserError):
            sb.check_command(bad)


def test_entrypoints():
    local = sb.build_entrypoint(["train", "my cfg.yaml", "optim.lr=1e-3"], "auto", is_local=True)
    assert local.startswith(f"{sys.executable} -m linrep train ") and "'my cfg.yaml'" in local
    assert sb.build_entrypoint(["sweep", "s"], "auto", is_local=False) == "linrep sweep s"
    assert sb.build_entrypoint(["train", "x"], "/opt/venv/bin/python", False) == "/opt/venv/bin/python -m linrep train x"
    assert sb.build_entrypoint(["train", "x"], "linrep", True) == "linrep train x"


def test_tracking_uri_for_the_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sb.job_tracking_uri("http://mlflow:5000", False, False) == ("http://mlflow:5000", None)
    assert sb.job_tracking_uri("http://127.0.0.1:5000", False, True) == ("http://127.0.0.1:5000", None)
    # relative stores would land in the job's temporary copy of the working dir
    assert sb.job_tracking_uri("sqlite:///mlruns/mlflow.db", False, True)[0] == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    # from the environment, a URI naming this machine is not passed to a remote cluster ...
    uri, note = sb.job_tracking_uri("http://localhost:5000", False, False)
    assert uri is None and "not passed" in note
    # ... and given explicitly it is an error
    with pytest.raises(UserError, match="names this machine"):
        sb.job_tracking_uri("sqlite:////abs/mlflow.db", True, False)
    assert sb.job_tracking_uri("cluster", True, False) == (None, None)


def test_env_items():
    assert sb.parse_env_items(["A=1", "B_C=x=y"]) == {"A": "1", "B_C": "x=y"}
    for bad in ("A", "=1", "A-B=1"):
        with pytest.raises(UserError):
            sb.parse_env_items([bad])


def test_prevalidate_catches_config_errors_before_any_connection(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(UserError, match="optim.lr"):
        sb.prevalidate(["train", "synthetic-supervised", "optim.lr=-1"], REPO)
    sb.prevalidate(["train", "synthetic-supervised", "optim.steps=300"], REPO)  # valid: no error


# ---- what travels --------------------------------------------------------------------------
def _project(root: Path, gitignore: str) -> Path:
    for rel in ("pkg/__init__.py", "pkg/data/__init__.py", "pkg/data/gen.py", "cfg/run.yaml",
                "data/shard-000.tar", "mlruns/mlflow.db", ".venv/bin/python", ".linrep-cluster/mlflow.db",
                "results/table.csv", "notes/big.bin", "secret.env"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / ".gitignore").write_text(gitignore)
    (root / ".rayignore").write_text("notes/\n")
    return root


def test_upload_listing_follows_ray_rules_and_always_excludes_stores(tmp_path):
    root = _project(tmp_path, "secret.env\n")
    listing = {p.relative_to(root).as_posix() for p in sb.upload_listing(root, sb.job_excludes(root, [], {}))}
    assert {"pkg/__init__.py", "pkg/data/__init__.py", "pkg/data/gen.py", "cfg/run.yaml"} <= listing
    for gone in ("data/shard-000.tar", "mlruns/mlflow.db", ".venv/bin/python", ".linrep-cluster/mlflow.db",
                 "results/table.csv", "notes/big.bin", "secret.env"):
        assert gone not in listing, gone
    sb.check_package_sources(root, sb.upload_listing(root, sb.job_excludes(root, [], {})))


def test_unanchored_gitignore_rule_that_drops_a_package_is_caught(tmp_path):
    root = _project(tmp_path, "data/\n")  # also matches pkg/data/
    listing = sb.upload_listing(root, sb.job_excludes(root, [], {}))
    with pytest.raises(UserError) as err:
        sb.check_package_sources(root, listing)
    assert "pkg/data/__init__.py" in str(err.value) and "'data/'" in str(err.value)


def test_path_arguments_must_travel(tmp_path):
    root = _project(tmp_path, "")
    listing = sb.upload_listing(root, sb.job_excludes(root, ["/cfg/"], {}))
    with pytest.raises(UserError, match="excluded from the upload"):
        sb.check_path_arguments(["train", "cfg/run.yaml"], root, listing, is_local=True)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.yaml"
    outside.write_text("{}")
    sb.check_path_arguments(["train", str(outside)], root, listing, is_local=True)  # same machine: fine
    with pytest.raises(UserError, match="outside the working dir"):
        sb.check_path_arguments(["train", str(outside)], root, listing, is_local=False)


def test_the_project_itself_uploads_every_package_source():
    listing = sb.upload_listing(REPO, sb.job_excludes(REPO, [], {}))
    sb.check_package_sources(REPO, listing)  # names the file and the .gitignore rule if not
    rel = {p.relative_to(REPO).as_posix() for p in listing}
    assert {"pyproject.toml", "linrep/cli.py", "linrep/submit.py", "trainer/config.py"} <= rel
    assert not any(r.startswith((".venv/", ".git/", "mlruns/")) for r in rel)


# ---- argparse wiring -----------------------------------------------------------------------
def test_parsers_register_submit_and_jobs():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    sb.add_submit_parser(sub)
    sb.add_jobs_parser(sub)
    a = p.parse_args(["submit", "--no-wait", "--env", "A=1", "train", "x", "a.b=1", "--address", "y"])
    assert a.func is sb.run_submit and a.no_wait and a.env == ["A=1"] and a.address is None
    assert a.command == ["train", "x", "a.b=1", "--address", "y"]  # everything after COMMAND is its own
    j = p.parse_args(["jobs", "logs", "linrep-1", "-f", "--address", "http://h:8265"])
    assert j.func is sb.run_jobs and j.action == "logs" and j.follow and j.address == "http://h:8265"


# ---- end to end on a real local cluster ----------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster.on_free_ports(tmp_path_factory.mktemp("cluster"))
    up = c.run("up", timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield c
    finally:
        down = c.run("down", timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr


def _env(c: LocalCluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH", "MLFLOW_"))}
    return {**env, "RAY_API_SERVER_ADDRESS": c.dashboard_url, "RAY_AUTH_TOKEN_PATH": str(c.token_file),
            "MLFLOW_TRACKING_URI": c.tracking_uri, "LINREP_CLUSTER_DIR": str(c.state_dir), "PYTHONUNBUFFERED": "1"}


def _jobs_client(c: LocalCluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(c.dashboard_url, headers={"Authorization": f"Bearer {c.token_file.read_text().strip()}"})


def test_submit_synthetic_run_end_to_end(cluster):
    job_id = sb.new_submission_id()
    t0 = time.monotonic()
    proc = subprocess.Popen([*LINREP, "submit", "--submission-id", job_id, "train", "synthetic-supervised",
                             "optim.steps=300", "run.checkpoint_every=100", "probe.samples=1024"],
                            cwd=REPO, env=_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = _jobs_client(cluster)
    to_running = None
    while proc.poll() is None and time.monotonic() - t0 < 120:
        try:
            if str(client.get_job_status(job_id)) != "PENDING":
                to_running = time.monotonic() - t0
                break
        except RuntimeError:  # not submitted yet
            pass
        time.sleep(0.2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{out[-3000:]}\n{err[-3000:]}"
    print(f"\nlinrep submit -> job RUNNING: {to_running:.1f} s")
    assert to_running is not None and to_running < 30
    assert out.splitlines()[0] == job_id and f"job {job_id} SUCCEEDED" in err
    assert str(client.get_job_status(job_id)) == "SUCCEEDED"

    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=cluster.tracking_uri)  # the real server, over HTTP
    exp = mlflow.get_experiment_by_name("synthetic")
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"tags.`linrep.ray_job_id` = '{job_id}'")
    assert len(runs) == 1, [r.data.tags for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    probe_steps = sorted(m.step for m in mlflow.get_metric_history(run.info.run_id, "probe/r2_affine"))
    assert probe_steps and probe_steps[-1] == 300
    assert mlflow.get_metric_history(run.info.run_id, "train/loss")


def test_failing_job_exits_nonzero_and_shows_its_error(cluster):
    (dead,) = free_ports(1)
    bad_uri = f"http://127.0.0.1:{dead}"  # a valid config whose tracking server is down: fails on the cluster
    job_id = sb.new_submission_id()
    out = subprocess.run([*LINREP, "submit", "--submission-id", job_id, "train", "synthetic-supervised",
                          f"tracking.uri={bad_uri}"], cwd=REPO, env=_env(cluster), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"linrep: error: job {job_id} FAILED") and bad_uri in last
    assert "Traceback" not in out.stderr
    assert str(_jobs_client(cluster).get_job_status(job_id)) == "FAILED"


def test_jobs_list_status_logs_stop(cluster):
    env = _env(cluster)
    job_id = sb.new_submission_id()
    sub = subprocess.run([*LINREP, "submit", "--no-wait", "--submission-id", job_id, "train", "synthetic-supervised",
                          "optim.steps=1000000", "probe.enabled=false"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert sub.returncode == 0 and sub.stdout.strip() == job_id, sub.stderr

    def jobs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*LINREP, "jobs", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    listed = jobs("list")
    assert listed.returncode == 0 and job_id in listed.stdout
    status = jobs("status", job_id)
    assert status.returncode == 0 and re.search(r"status:\s+(PENDING|RUNNING)", status.stdout)
    stop = jobs("stop", job_id, "--wait")
    assert stop.returncode == 0 and f"job {job_id} STOPPED" in stop.stdout, stop.stdout + stop.stderr
    logs = jobs("logs", job_id)
    assert logs.returncode == 0 and "Running entrypoint" in logs.stdout
    missing = jobs("status", "linrep-no-such-job")
    assert missing.returncode == 2 and "no job 'linrep-no-such-job'" in missing.stderr


def test_only_loopback_listeners_after_jobs_ran(cluster):
    """The socket table of every process the cluster started, Ray workers and drivers included."""
    rows = listeners(list(cluster.pids().values()))
    assert {cluster.ray_port, cluster.dashboard_port, cluster.mlflow_port} <= {r[1] for r in rows}
    assert [r for r in rows if r[0] not in LOOPBACK] == []
