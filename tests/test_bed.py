"""infra/local/bed.sh for real: a head and two Ray worker nodes plus a client, each in its own
network, PID and mount namespace on one machine, with MLflow on PostgreSQL and an S3 store (moto).

Everything a user does is done from the `client` namespace (`bed.sh exec client ...`): the Jobs
API, MLflow, S3, `linrep submit`. Needs root and `ip netns`; otherwise the module is skipped.
The tests share one bed (module-scoped) and run in file order: the last ones kill a node and take
the bed down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from infra.local.bedlib import Bed, is_alive
from tests.conftest import REPO

pytestmark = pytest.mark.bed

BED_PORTS = {6379, 8265, 5000, 9000, 5432}
TOKEN = "/home/root/.ray/auth_token"  # on every node (its own /home)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the test bed needs root (network, PID and mount namespaces)"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "the test bed needs iproute2's 'ip netns'"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "the test bed needs PostgreSQL's server (apt-get install postgresql)"
    return None


def _root_listeners() -> set[tuple[str, int, int | None]]:
    """(address, port, pid) of every listening TCP socket in this (the root) network namespace."""
    return {(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def _bed_pids(bed: Bed) -> set[int]:
    return {p for node in ("head", "w1", "w2", "client") for p in bed.node_pids(node)}


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    b = Bed(tmp_path_factory.mktemp("bed"), name=f"lrbt{os.getpid() % 100000}")
    b.root_before = _root_listeners()
    t0 = time.monotonic()
    up = b.run("up", timeout=420)
    b.up_seconds = time.monotonic() - t0
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        print(f"\nbed.sh up: {b.up_seconds:.0f} s")
        b.pids_seen = _bed_pids(b)
        yield b
    finally:
        down = b.run("down", "--purge", timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not [n for n in _netns() if n.startswith(b.name + "-")]


def _netns() -> list[str]:
    return [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                       text=True).stdout.splitlines() if line.strip()]


def _client_py(bed: Bed, code: str, *args: str, timeout: float = 300) -> dict | list:
    """Run Python on the client node; its last stdout line is JSON."""
    out = bed.exec("client", sys.executable, "-c", code, *args, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- 1. the bed is real ----------------------------------------------------------------------
JOB = r"""
import json, os, ray
ray.init()
@ray.remote(num_cpus=1)
def where():
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "home": os.environ["HOME"],
            "init": open("/proc/1/cmdline").read().replace("\0", " "), "tmp": sorted(os.listdir("/tmp"))}
out = ray.get([where.options(resources={"bed_w1": 1}).remote(), where.options(resources={"bed_w2": 1}).remote()])
print("BED-RESULT " + json.dumps(out))
"""

SUBMIT = r"""
import json, os, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
client = JobSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"], headers={"Authorization": f"Bearer {token}"})
job = client.submit_job(entrypoint=sys.argv[1])
deadline = time.monotonic() + 240
while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    assert time.monotonic() < deadline, "job did not finish"
    time.sleep(0.5)
print(json.dumps({"status": str(client.get_job_status(job)), "logs": client.get_job_logs(job)}))
"""


def test_a_job_from_the_client_runs_tasks_on_w1_and_on_w2(bed):
    import shlex

    # The entrypoint names this interpreter by absolute path (the job runs with the head's PATH).
    out = _client_py(bed, SUBMIT, shlex.join([sys.executable, "-c", JOB]))
    assert out["status"] == "SUCCEEDED", out["logs"][-3000:]
    (line,) = [l for l in out["logs"].splitlines() if l.startswith("BED-RESULT ")]
    w1, w2 = json.loads(line[len("BED-RESULT "):])
    cfg = bed.config()
    assert (w1["ip"], w2["ip"]) == (cfg["w1"], cfg["w2"])
    assert w1["node_id"] != w2["node_id"]
    # each node is its own PID namespace (PID 1 is that node's init) with its own /tmp and HOME
    assert "bedlib.py init w1" in w1["init"] and "bedlib.py init w2" in w2["init"]
    assert w1["home"] == w2["home"] == "/home/root" and "ray" in w1["tmp"]
    assert (bed.state_dir / "nodes" / "w1" / "tmp" / "ray").is_dir()


REACH = r"""
import json, socket, sys
def reach(host, port):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect((host, port)); return True
    except OSError:
        return False
    finally:
        s.close()
print(json.dumps([reach(h, p) for h, p in json.loads(sys.argv[1])]))
"""


def test_the_client_reaches_the_head_but_no_loopback_and_not_the_machine(bed):
    head = bed.config()["head"]
    with socket.socket() as root_server:  # a server in the machine's own namespace, on every address
        root_server.bind(("0.0.0.0", 0))
        root_server.listen()
        port = root_server.getsockname()[1]
        machine_ips = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                       if a.family == socket.AF_INET]
        targets = [(head, 8265), (head, 5000), ("127.0.0.1", 8265), ("127.0.0.1", 52365), ("127.0.0.1", 5000),
                   *[(ip, port) for ip in machine_ips]]
        got = _client_py(bed, REACH, json.dumps(targets), timeout=120)
    assert got[:2] == [True, True], targets[:2]
    # the head's Jobs API and its dashboard agent (which listens on the head's own 127.0.0.1) and
    # every address of the machine are out of the client's reach
    assert not any(got[2:]), list(zip(targets[2:], got[2:]))


MLFLOW_S3 = r"""
import json, os, tempfile, pathlib
import boto3, mlflow
c = mlflow.MlflowClient()  # MLFLOW_TRACKING_URI from the client's environment
exp = c.get_experiment_by_name("bed") or c.get_experiment(c.create_experiment("bed"))
run = c.create_run(exp.experiment_id)
c.log_metric(run.info.run_id, "bed/x", 1.5, step=3)
f = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
f.write_text("hello bed")
c.log_artifact(run.info.run_id, str(f))
c.set_terminated(run.info.run_id)
s3 = boto3.client("s3")  # endpoint and credentials from the environment
s3.put_object(Bucket="linrep", Key="probe/k.txt", Body=b"v1")
print(json.dumps({
    "run_id": run.info.run_id, "uri": os.environ["MLFLOW_TRACKING_URI"],
    "metric": [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, "bed/x")],
    "artifacts": [a.path for a in c.list_artifacts(run.info.run_id)],
    "s3_get": s3.get_object(Bucket="linrep", Key="probe/k.txt")["Body"].read().decode(),
    "artifact_keys": [o["Key"] for o in s3.list_objects_v2(Bucket="linrep-artifacts").get("Contents", [])],
}))
"""


def test_mlflow_on_postgres_and_the_s3_store_answer_the_client(bed):
    out = _client_py(bed, MLFLOW_S3)
    assert out["uri"] == f"http://{bed.config()['head']}:5000"
    assert out["metric"] == [[3, 1.5]] and out["artifacts"] == ["note.txt"]
    assert out["s3_get"] == "v1"
    # the artifact went through the tracking server into the S3 store
    assert any(k.endswith(f"{out['run_id']}/artifacts/note.txt") for k in out["artifact_keys"]), out
    # and the run is in PostgreSQL (asked on the head, as the database's admin over its unix socket)
    sql = f"SELECT value FROM metrics WHERE run_uuid = '{out['run_id']}' AND key = 'bed/x'"
    pg = bed.exec("head", "runuser", "-u", "postgres", "--", "psql", "-h", "/tmp", "-d", "mlflow", "-tAc", sql)
    assert pg.returncode == 0 and pg.stdout.strip() == "1.5", pg.stdout + pg.stderr


def test_no_credential_is_on_any_command_line_or_in_the_logs(bed):
    secrets = {f.name: f.read_text().strip() for f in (bed.state_dir / "secrets").iterdir()}
    assert {"ray_token", "pg_password", "s3_key_id", "s3_secret"} <= set(secrets)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        assert not [name for name, value in secrets.items() if value in line], (proc.info["pid"], line[:200])
    for log in (bed.state_dir / "logs").iterdir():
        text = log.read_text(errors="replace")
        assert not [name for name, value in secrets.items() if value in text], log
    assert (bed.state_dir / "secrets").stat().st_mode & 0o077 == 0


# ---- 2. sockets --------------------------------------------------------------------------------
def test_every_socket_of_the_bed_is_inside_its_namespaces(bed):
    cfg = bed.config()
    bed_pids = _bed_pids(bed)
    assert len(bed_pids) > 20  # Postgres, moto, MLflow, three Ray nodes
    # nothing the bed runs listens in the machine's namespace, and no bed port appeared there
    now = _root_listeners()
    assert not [row for row in now if row[2] in bed_pids]
    before_ports = {port for _, port, _ in bed.root_before}
    assert not {port for _, port, _ in now} & (BED_PORTS - before_ports)
    # inside: each node listens only on its own bed address or its own loopback
    for node in ("head", "w1", "w2", "client"):
        rows = subprocess.run(["ip", "netns", "exec", bed.namespace(node), "ss", "-Hltn"], capture_output=True,
                              text=True, check=True).stdout.split("\n")
        local = [r.split()[3] for r in rows if r.strip()]
        allowed = {cfg[node], "127.0.0.1", "0.0.0.0", "*", "[::]", f"[::ffff:{cfg[node]}]", "[::ffff:127.0.0.1]"}
        assert not [a for a in local if a.rsplit(":", 1)[0] not in allowed], (node, local)
        if node == "head":
            assert {f"{cfg['head']}:{p}" for p in (8265, 5000, 9000, 5432)} <= set(local), local
    status = bed.run("status", timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"[{bed.namespace('head')}]" in status.stdout and "MLflow  " in status.stdout


# ---- 4. linrep submit from the client ------------------------------------------------------
def _linrep(bed: Bed, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`linrep ...` on the client node, from this checkout (the upload is the working dir)."""
    return bed.exec("client", sys.executable, "-m", "linrep", *args, timeout=timeout)


def test_linrep_submit_from_the_client_reaches_running(bed):
    """The Jobs API path a user takes, timed: `linrep submit` to the job RUNNING on the head."""
    t0 = time.monotonic()
    sub = _linrep(bed, "submit", "--no-wait", "train", "synthetic-supervised", "optim.steps=1000000",
                  "probe.enabled=false", timeout=120)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = sub.stdout.strip().splitlines()[0]
    status = ""
    while time.monotonic() - t0 < 60:
        out = _linrep(bed, "jobs", "status", job_id, timeout=60)
        status = out.stdout
        if re.search(r"status:\s+RUNNING", status):
            break
        time.sleep(0.5)
    assert re.search(r"status:\s+RUNNING", status), status
    print(f"\nlinrep submit -> job RUNNING: {time.monotonic() - t0:.1f} s (polled with `linrep jobs status`)")
    assert time.monotonic() - t0 < 60
    stop = _linrep(bed, "jobs", "stop", job_id, "--wait", timeout=120)
    assert stop.returncode == 0 and f"job {job_id} STOPPED" in stop.stdout, stop.stdout + stop.stderr


# ---- 5. issue 13: cluster paths on the bed ------------------------------------------------------
S3_LIST = r"""
import json, sys, boto3
s3 = boto3.client("s3")  # the client's endpoint and credentials
keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[1], Prefix=sys.argv[2])
        for o in p.get("Contents", [])]
print(json.dumps(keys))
"""

RUN_RECORD = r"""
import json, os, sys, urllib.request
import mlflow
name, keys = sys.argv[1], [k for k in sys.argv[2].split(",") if k]
c = mlflow.MlflowClient()
runs = [] if name == "-" else c.search_runs([e.experiment_id for e in c.search_experiments()], f"attributes.run_name = '{name}'")
assert name == "-" or len(runs) == 1, [r.info.run_name for r in runs]
run = runs[0] if runs else None
hist = {k: sorted(m.step for m in c.get_metric_history(run.info.run_id, k)) for k in keys}
probe = sorted(k for k in run.data.metrics if k.startswith("probe/")) if run else []
probe_steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, probe[0])) if probe else []
# where each actor of the run ran: the Ray state API (actors, nodes) asked from the client
token = open(os.environ["RAY_AUTH_TOKEN_PATH"]).read().strip()
def get(path):
    req = urllib.request.Request(os.environ["RAY_API_SERVER_ADDRESS"] + path, headers={"Authorization": f"Bearer {token}"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())["data"]["result"]["result"]
ips = {n["node_id"]: n["node_ip"] for n in get("/api/v0/nodes?limit=100&detail=true")}
actors = [(a["class_name"], ips.get(a["node_id"]), a["actor_id"]) for a in get("/api/v0/actors?limit=1000&detail=true")]
print(json.dumps({"run_id": run and run.info.run_id, "status": run and run.info.status, "hist": hist,
                  "probe": probe, "probe_steps": probe_steps, "actors": actors}))
"""


def _listeners(bed: Bed) -> dict[str, list[tuple[str, str]]]:
    """node -> [(local address:port, command line)] of every listening TCP socket, from `ss -ltnp`
    in that node's network namespace (its pids are the machine's: their /proc is readable here)."""
    out = {}
    for node in ("head", "w1", "w2", "client"):
        rows = subprocess.run(["ip", "netns", "exec", bed.namespace(node), "ss", "-Hltnp"], capture_output=True,
                              text=True, check=True).stdout.splitlines()
        out[node] = [(r.split()[3], _cmdline(int((re.findall(r"pid=(\d+)", r) or ["0"])[0]))[:120])
                     for r in rows if r.strip()]
    return out


# Ray 2.60 binds the gRPC servers of its core (GCS, raylet, every core worker: actors, tasks and
# the job's driver, the dashboard's and agents' internal ports) to all addresses, with no setting
# to change it (ray._private.services.get_all_interfaces_ip, dashboard/agent.py: all interfaces
# unless the node IP is loopback). Justified on the bed, where a node's namespace holds only its
# loopback and its own bed address, and on a real cluster only behind the private network Ray's
# security guidance asks for (token auth on). Everything else listens on its node's own address
# or 127.0.0.1.
RAY_CORE = ("ray::", "/ray/", "raylet", "gcs_server", "-m linrep", "/bin/linrep ")  # linrep: the job's driver


def _is_ray_core(cmdline: str) -> bool:
    return any(mark in cmdline for mark in RAY_CORE)


def _wait_for(pred, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_mlflow(bed: Bed) -> list[int]:
    """SIGKILL the MLflow server on the head (the server and its uvicorn workers, by pid)."""
    import signal

    pids = [p for p in bed.node_pids("head") if "mlflow" in (line := _cmdline(p)) and
            ("server" in line or "uvicorn" in line or "gunicorn" in line)]
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


CHECKPOINT_FOLDERS = r"""
import json, sys
from trainer.checkpoint import PRUNED_MARKER, is_complete
from trainer.storage import locate
def state(folder):
    if is_complete(folder):
        return "whole"
    return "pruned" if set(folder.files()) == {PRUNED_MARKER} else "partial"  # retention keeps a marker
run = locate(sys.argv[1])
print(json.dumps({d.name: state(d) for d in run.subdirs("checkpoint_")}))
"""


def _moto_pids(bed: Bed) -> list[int]:
    return [p for p in bed.node_pids("head") if "moto.server" in _cmdline(p)]


@pytest.mark.slow
def test_s3_run_on_w1_w2_probe_on_head_sockets_a_store_pause_and_a_tracking_restart(bed):
    """Issue 13, items 1, 5 and 6 in one run (each two-node run costs a minute on 2 cores):
    `linrep submit train` from the client, 2 Ray Train workers (one on w1, one on w2), checkpoints
    in s3://linrep on the head's moto, the probe actor pinned to the head by
    probe.actor_resources={bed_head: 1} (the head offers that custom resource and 0 CPUs).
    After the first checkpoint: every node's listening sockets; then the S3 store stops answering
    for 15 s (moto keeps its buckets in memory, so a pause, SIGSTOP, not a restart: it accepts
    connections and answers nothing, like a hung endpoint; pyarrow's default client gave up after
    11 s: 3 attempts x 3 s): the checkpoint uploads and the probe actor's reads wait it out
    (trainer.storage: a 60 s request timeout that Ray Train's pickled filesystem keeps). Then the
    MLflow server is killed and started again, a restart that outlasts the end of training (57 s
    measured here once): rank 0's logger and the driver wait it out (tracking.outage_wait_s, 180 s
    here for a slow CI machine). The run finishes, every train step is logged exactly once
    (Postgres), every checkpoint folder in the bucket is whole (meta.json's sizes match the
    bucket's) or pruned by retention, none half-written, the probes are in MLflow."""
    cfg = bed.config()
    name, steps, every, log_every = "bed-s3-run", 1200, 300, 20
    before = {a for _, _, a in _client_py(bed, RUN_RECORD, "-", "", timeout=120)["actors"]}
    t0 = time.monotonic()
    job = subprocess.Popen(
        ["bash", str(REPO / "infra" / "local" / "bed.sh"), "exec", "client", sys.executable, "-m", "linrep", "submit",
         "train", "synthetic-supervised", f"run.name={name}", "run.workers=2", "run.storage=s3://linrep/runs",
         f"optim.steps={steps}", f"optim.warmup_steps={steps // 10}", f"run.checkpoint_every={every}",
         f"run.log_every={log_every}", "probe.samples=1024", "probe.actor_resources={bed_head: 1}",
         "tracking.outage_wait_s=180"],
        env=bed.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def first_checkpoint():
            keys = _client_py(bed, S3_LIST, "linrep", f"runs/{name}", timeout=60)
            return [k for k in keys if k.endswith("/meta.json")]
        _wait_for(first_checkpoint, 300, "the first checkpoint in s3://linrep/runs")
        # item 6: the sockets of every node while the run trains
        sockets = _listeners(bed)
        for node, rows in sockets.items():
            own = {cfg[node], "127.0.0.1", f"[::ffff:{cfg[node]}]", "[::ffff:127.0.0.1]"}
            wildcard = [(a, p) for a, p in rows if a.rsplit(":", 1)[0] in ("*", "0.0.0.0", "[::]")]
            print(f"\n[{node}] {len(rows)} listening, {len(wildcard)} of them Ray core on all addresses: "
                  f"{sorted(a for a, _ in rows if (a, _) not in wildcard)}; wildcard: "
                  f"{sorted((a, p.split(' -')[0][:40]) for a, p in wildcard)}")
            assert not [(a, p) for a, p in wildcard if not _is_ray_core(p)], (node, wildcard)
            assert not [(a, p) for a, p in rows if (a, p) not in wildcard and a.rsplit(":", 1)[0] not in own], \
                (node, rows)
        head_services = {a for a, _ in sockets["head"]}
        assert {f"{cfg['head']}:{p}" for p in (5000, 5432, 8265, 9000)} <= head_services  # MLflow, Postgres, Jobs, S3
        assert not sockets["client"], sockets["client"]  # the client runs no server
        # the object store stops answering for a while
        moto = _moto_pids(bed)
        assert moto, "no moto server process on the head"
        for pid in moto:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(15)
            running_through_the_pause = job.poll() is None
        finally:
            for pid in moto:
                os.kill(pid, signal.SIGCONT)
        assert running_through_the_pause  # it could not finish without the store: its checkpoints live there
        # item 5: the tracking server goes away, and is back only after training has ended
        killed = _kill_mlflow(bed)
        assert killed, "no MLflow server process on the head"
        outage_start = time.monotonic()
        time.sleep(15)
        up = bed.run("up", timeout=300)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        print(f"\nMLflow down for {time.monotonic() - outage_start:.0f} s (pids {killed}); the run "
              f"{'had ended training' if job.poll() is not None else 'was still running'}")
        out, err = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    print(f"\nthe run, submit to end: {time.monotonic() - t0:.0f} s")
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    # item 1: the checkpoints are in the bucket (the kept ones, each complete: meta.json is written last)
    folders = _client_py(bed, CHECKPOINT_FOLDERS, f"s3://linrep/runs/{name}", timeout=60)
    assert max(folders) == f"checkpoint_{steps:08d}" and folders[max(folders)] == "whole", folders
    assert set(folders.values()) <= {"whole", "pruned"}, folders  # nothing half-written was left behind
    assert not list((bed.state_dir / "shared" / "ray_results").glob(f"{name}*"))  # nothing on /srv
    rec = _client_py(bed, RUN_RECORD, name, "train/loss,train/acc", timeout=120)
    assert rec["status"] == "FINISHED", rec["status"]
    # every step exactly once, through the restart: no duplicate, no gap
    want = list(range(log_every, steps + 1, log_every))
    assert rec["hist"]["train/loss"] == want, rec["hist"]["train/loss"]
    assert rec["hist"]["train/acc"] == want
    sql = (f"SELECT step, count(*) FROM metrics WHERE run_uuid = '{rec['run_id']}' AND key = 'train/loss' "
           "GROUP BY step HAVING count(*) > 1")
    pg = bed.exec("head", "runuser", "-u", "postgres", "--", "psql", "-h", "/tmp", "-d", "mlflow", "-tAc", sql)
    assert pg.returncode == 0 and pg.stdout.strip() == "", pg.stdout + pg.stderr
    # the probe metrics reached the Postgres-backed MLflow, at checkpoint steps
    assert rec["probe"] and rec["probe_steps"], rec["probe"]
    assert set(rec["probe_steps"]) <= set(range(every, steps + 1, every)), rec["probe_steps"]
    # where things ran: the Train workers on w1 and w2, the probe actor on the head
    job_actors = [(c, ip) for c, ip, actor_id in rec["actors"] if actor_id not in before]  # this run's
    workers = sorted(ip for c, ip in job_actors if c == "RayTrainWorker")
    probes = {ip for c, ip in job_actors if c == "_ProbeActor"}
    assert workers == sorted([cfg["w1"], cfg["w2"]]), job_actors
    assert probes == {cfg["head"]}, job_actors


@pytest.mark.slow
def test_losing_w1_mid_run_resumes_from_the_last_checkpoint_with_every_step_logged_once(bed):
    """Issue 13, item 4: a 2-worker run with checkpoints on the shared /srv; after the first
    checkpoint w1 is killed (every process of the node), then started again. Ray Train
    (run.max_failures) restarts the worker group on w1 + w2, the workers restore the newest
    complete checkpoint, and the metric logger skips the steps already in MLflow."""
    name, steps, every, log_every = "bed-node-loss", 1200, 300, 20
    run_dir = bed.state_dir / "shared" / "ray_results" / name
    t0 = time.monotonic()
    job = subprocess.Popen(
        ["bash", str(REPO / "infra" / "local" / "bed.sh"), "exec", "client", sys.executable, "-m", "linrep", "submit",
         "train", "synthetic-supervised", f"run.name={name}", "run.workers=2", "run.max_failures=2",
         f"optim.steps={steps}", f"optim.warmup_steps={steps // 10}", f"run.checkpoint_every={every}",
         f"run.log_every={log_every}", "probe.enabled=false"],
        env=bed.env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def complete_checkpoints():
            return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoint_*/meta.json"))
        seen = _wait_for(complete_checkpoints, 300, f"the first checkpoint in {run_dir}", poll=0.2)
        killed = bed.run("kill-node", "w1", timeout=60)
        assert killed.returncode == 0, killed.stdout + killed.stderr
        print(f"\nw1 killed with checkpoints {seen} on /srv")
        started = bed.run("start-node", "w1", timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        out, err = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    print(f"\nthe run, submit to end: {time.monotonic() - t0:.0f} s")
    assert job.returncode == 0, out[-3000:] + err[-3000:]
    resumed = [int(m) for m in re.findall(r"\[linrep\] resumed from step (\d+)", out)]
    assert len(resumed) == 1 and resumed[0] >= seen[-1] and resumed[0] % every == 0, (resumed, seen, out[-3000:])
    assert resumed[0] < steps
    rec = _client_py(bed, RUN_RECORD, name, "train/loss,train/samples_per_s", timeout=120)
    assert rec["status"] == "FINISHED"
    want = list(range(log_every, steps + 1, log_every))
    assert rec["hist"]["train/loss"] == want, rec["hist"]["train/loss"]  # no duplicate, no gap
    assert rec["hist"]["train/samples_per_s"] == want
    assert sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoint_*/meta.json"))[-1] == steps




@pytest.mark.slow
def test_a_sweep_submitted_from_the_client_keeps_its_folder_in_s3(bed):
    """Issue 13, item 3: `linrep submit sweep` from the client, a 2-trial grid (1 worker each, two
    at a time: one trial per worker node), the sweep folder in s3://linrep/sweeps. The spec,
    tests/bed-grid.yaml, travels with the working dir as a user's would."""
    before = {a for _, _, a in _client_py(bed, RUN_RECORD, "-", "", timeout=120)["actors"]}
    t0 = time.monotonic()
    out = _linrep(bed, "submit", "sweep", "tests/bed-grid.yaml", "--storage", "s3://linrep/sweeps", timeout=600)
    print(f"\nthe sweep, submit to end: {time.monotonic() - t0:.0f} s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    keys = _client_py(bed, S3_LIST, "linrep", "sweeps/bed-grid", timeout=60)
    assert any(k.endswith("summary/summary.csv") for k in keys), keys
    assert any(k.endswith("summary/summary.md") for k in keys), keys
    assert not list((bed.state_dir / "shared").glob("ray_results/sweeps/bed-grid*"))  # nothing on /srv
    cfg = bed.config()
    actors = [(c, ip) for c, ip, a in _client_py(bed, RUN_RECORD, "-", "", timeout=120)["actors"] if a not in before]
    workers = {ip for c, ip in actors if c == "RayTrainWorker"}
    assert workers and workers <= {cfg["w1"], cfg["w2"]}, actors  # trials ran on the worker nodes only
    assert {ip for c, ip in actors if c == "_ProbeActor"} == {cfg["head"]}, actors


@pytest.mark.slow
def test_reproduce_submitted_from_the_client_runs_its_plan_on_the_workers_and_keeps_its_tables_in_s3(bed):
    """Issue 13, item 5: `linrep submit reproduce synthetic --quick --budget 0.1`: the quick plan's
    three trials at the 20-step floor, each trained in its own trial process (one CPU worker:
    tune/sweep.py's in-process trials), two at a time (one per worker node), the sweep folder with
    the paper's table in s3://linrep/sweeps."""
    before = {a for _, _, a in _client_py(bed, RUN_RECORD, "-", "", timeout=120)["actors"]}
    t0 = time.monotonic()
    out = _linrep(bed, "submit", "reproduce", "synthetic", "--quick", "--budget", "0.1",
                  "--storage", "s3://linrep/sweeps", timeout=600)
    print(f"\nreproduce --quick, submit to end: {time.monotonic() - t0:.0f} s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "reproduce: 3/3 trials finished" in out.stdout, out.stdout[-3000:]
    keys = _client_py(bed, S3_LIST, "linrep", "sweeps/reproduce-synthetic-quick-b0.1", timeout=60)
    assert any(k.endswith("summary/paper_table.md") for k in keys), keys
    assert not list((bed.state_dir / "shared").glob("ray_results/sweeps/reproduce*"))  # nothing on /srv
    cfg = bed.config()
    actors = [(c, ip) for c, ip, a in _client_py(bed, RUN_RECORD, "-", "", timeout=120)["actors"] if a not in before]
    trials = {ip for c, ip in actors if c.endswith("ResourceTrainable")}  # tune.with_resources(LinrepTrial)
    assert trials == {cfg["w1"], cfg["w2"]}, actors  # both worker nodes took trials (the head has no CPU)
    assert not any(c == "RayTrainWorker" for c, _ in actors), actors  # trained in the trial processes


UPLOAD = r"""
import sys
from trainer.storage import locate
locate(sys.argv[2]).upload(sys.argv[1])
print('"ok"')
"""


@pytest.mark.slow
def test_zero2_dislib_run_reads_its_shards_from_s3(bed):
    """Issue 13, item 2: tiny dSprites shards (the converter's own renderer, 160 images) uploaded
    from the client to s3://linrep/dsprites; a ZeRO-2 DeepSpeed run of dislib-dsprites-mlp on
    w1 + w2 streams them from the bucket (data.root=s3://..., trainer.storage) and keeps its
    checkpoints there too."""
    from trainer.data.convert import dsprites as ds

    local = bed.state_dir / "shared" / "dsprites"
    ds.generate_dsprites(local, seed=0, samples_per_shard=40, processes=1, limit=160, progress=False)
    _client_py(bed, UPLOAD, "/srv/dsprites", "s3://linrep/dsprites", timeout=120)
    name, steps = "bed-zero2-dsprites", 20
    t0 = time.monotonic()
    out = _linrep(bed, "submit", "train", "dislib-dsprites-mlp", f"run.name={name}", "data.root=s3://linrep/dsprites",
                  "run.storage=s3://linrep/runs", "run.workers=2", "optim.zero_stage=2", "optim.batch_size=16",
                  f"optim.steps={steps}", "run.checkpoint_every=10", "run.log_every=5", "run.stop_at={}",
                  "model.hidden=[32, 32]", "data.image_size=32", "data.shuffle_buffer=20", "data.loader_workers=0",
                  "probe.max_train_samples=64", "probe.max_eval_samples=16", "probe.actor_resources={bed_head: 1}",
                  "--verbose", timeout=600)  # --verbose: Ray's worker lines (ip=...) on the console
    print(f"\nZeRO-2 dSprites from S3, submit to end: {time.monotonic() - t0:.0f} s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cfg = bed.config()
    assert f"ip={cfg['w1']}" in out.stdout and f"ip={cfg['w2']}" in out.stdout  # a worker on each node
    keys = _client_py(bed, S3_LIST, "linrep", f"runs/{name}", timeout=60)
    assert any(k.endswith(f"checkpoint_{steps:08d}/meta.json") for k in keys), keys
    rec = _client_py(bed, RUN_RECORD, name, "train/loss", timeout=120)
    assert rec["status"] == "FINISHED" and rec["hist"]["train/loss"] == [5, 10, 15, 20], rec["hist"]
    assert any(k.startswith("probe/pearson/") for k in rec["probe"]), rec["probe"]  # the factor probes, in MLflow
    assert rec["probe_steps"] == [10, 20], rec["probe_steps"]

    # `linrep submit probe RUN_ID` (issue 13, item 5): the job finds the run folder in the bucket
    # from the run's tag, probes both checkpoints again and logs nothing twice
    t0 = time.monotonic()
    out = _linrep(bed, "submit", "probe", rec["run_id"], timeout=300)
    print(f"linrep submit probe, submit to end: {time.monotonic() - t0:.0f} s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[1/2] step 10: " in out.stdout and "[2/2] step 20: " in out.stdout, out.stdout[-2000:]
    again = _client_py(bed, RUN_RECORD, name, "", timeout=120)
    assert again["probe_steps"] == [10, 20] and again["status"] == "FINISHED", again


# ---- 3. idempotence, a killed node, down ---------------------------------------------------
def test_up_again_starts_nothing(bed):
    inits = {n: bed.init_pid(n) for n in ("head", "w1", "w2", "client")}
    again = bed.run("up", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 6, again.stdout  # 4 head servers + 2 workers
    assert {n: bed.init_pid(n) for n in inits} == inits


NODES_STATE = r"""
import json, os, sys, time
sys.path.insert(0, "infra/local")
import bedlib
head, ip, want = sys.argv[1:4]
deadline, t0 = time.monotonic() + 60, time.monotonic()
while True:
    alive = [r["node_ip"] for r in bedlib.alive_nodes(f"http://{head}:8265", os.environ["RAY_AUTH_TOKEN_PATH"])]
    if (ip in alive) == (want == "alive") or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"alive": alive, "seconds": time.monotonic() - t0}))
"""


def test_kill_node_kills_all_of_w1_and_ray_sees_it_dead(bed):
    cfg = bed.config()
    pids = bed.node_pids("w1")
    assert len(pids) >= 3, pids  # init, raylet, agents
    killed = bed.run("kill-node", "w1", timeout=60)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert not [p for p in pids if is_alive(p)]
    dead = _client_py(bed, NODES_STATE, cfg["head"], cfg["w1"], "dead")
    assert cfg["w1"] not in dead["alive"] and cfg["w2"] in dead["alive"], dead
    print(f"\nRay declared w1 dead {dead['seconds']:.1f} s after kill-node returned")
    started = bed.run("start-node", "w1", timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    back = _client_py(bed, NODES_STATE, cfg["head"], cfg["w1"], "alive")
    assert cfg["w1"] in back["alive"], back


def test_down_leaves_nothing_and_is_idempotent(bed):
    pids = _bed_pids(bed) | bed.pids_seen
    w2 = set(bed.node_pids("w2"))
    assert w2
    (bed.state_dir / "run" / "w2.pid").unlink()  # stale state, as after a killed test: down still finds w2
    down = bed.run("down", timeout=180)
    assert "node w2: killing leftover processes" in down.stdout, down.stdout
    assert not [p for p in w2 if is_alive(p)]
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [n for n in _netns() if n.startswith(bed.name + "-")]
    assert not [p for p in pids if is_alive(p)]
    assert not list((bed.state_dir / "run").glob("*.pid"))
    again = bed.run("down", timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    status = bed.run("status", timeout=60)
    assert status.returncode == 3 and "down  (no namespace)" in status.stdout


def test_bed_sh_usage_and_unknown_node():
    script = REPO / "infra" / "local" / "bed.sh"
    out = subprocess.run(["bash", str(script), "sideways"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage:" in out.stderr
    if os.geteuid() == 0:
        out = subprocess.run(["bash", str(script), "kill-node", "w9"], capture_output=True, text=True)
        assert out.returncode == 1 and out.stderr.strip() == "bed.sh: no node 'w9' (nodes: head w1 w2 client)"


def test_bed_sh_up_without_root_says_so_in_one_line():
    if os.geteuid() != 0:
        out = subprocess.run(["bash", str(REPO / "infra" / "local" / "bed.sh"), "up"], capture_output=True, text=True)
    else:  # as root: run it as an unprivileged user
        if shutil.which("runuser") is None:
            pytest.skip("needs runuser to drop root")
        out = subprocess.run(["runuser", "-u", "nobody", "--", "bash", str(REPO / "infra" / "local" / "bed.sh"), "up"],
                             capture_output=True, text=True, env={"PATH": os.environ["PATH"], "LINREP_BED_DIR": "/nonexistent"})
    assert out.returncode == 1
    assert out.stderr.strip() == ("bed.sh: needs root (network, PID and mount namespaces) and iproute2's 'ip netns'")
