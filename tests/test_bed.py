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


@pytest.mark.slow
def test_linrep_submit_trains_on_w1_and_w2_with_the_shared_volume(bed):
    """Two Ray Train workers, one per worker node, checkpoints on the shared /srv (the stand-in for
    NFS), tracking on the bed's MLflow server. ~3.5 min on 2 cores."""
    out = _linrep(bed, "submit", "train", "synthetic-supervised", "optim.steps=100", "optim.warmup_steps=10",
                  "run.checkpoint_every=50", "probe.samples=1024", "run.workers=2", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    to_running = re.search(r"RUNNING ([0-9.]+) s after `linrep submit` started", out.stderr)
    print(f"\nlinrep submit -> RUNNING: {to_running.group(1)} s; whole job: {out.stderr.strip().splitlines()[-1]}")
    cfg = bed.config()
    assert f"ip={cfg['w1']}" in out.stdout and f"ip={cfg['w2']}" in out.stdout  # a worker on each node
    run_dirs = list((bed.state_dir / "shared" / "ray_results").glob("synthetic-supervised-*"))
    assert run_dirs, "no checkpoints on the shared volume"
    assert re.search(r"MLflow run id: \w+ .*store http://" + re.escape(cfg["head"]) + ":5000", out.stdout)


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
