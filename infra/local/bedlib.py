"""Helpers for infra/local/bed.sh (a multi-node Ray cluster in Linux namespaces on one machine),
and a Python handle on that script for tests.

bed.sh calls this file as a small CLI (`python bedlib.py COMMAND ...`) for what is fragile in
bash: the init process of each node's PID namespace, finding a namespace's processes, waiting for
HTTP endpoints and for Ray nodes to join, and creating the S3 buckets.

The `init` command runs as PID 1 of a node, so it imports only the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "bed.sh"
NODES = ("head", "w1", "w2", "client")


# ---- PID 1 of a node -----------------------------------------------------------------------
def run_init(node: str) -> int:
    """Reap every orphan of the node (Ray daemons, servers) until SIGTERM; exiting as PID 1 makes
    the kernel kill every process of the namespace."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the shell that ran `up` stops nothing
    print(f"bed node {node}: init pid {os.getpid()} in its PID namespace", flush=True)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            time.sleep(1)


# ---- processes -----------------------------------------------------------------------------
def child_of(pid: int, timeout: float = 10.0) -> int | None:
    """The first child of `pid` (unshare --fork's child: the node's init), waiting for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return None
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_alive(pid: int, expect: str | None = None) -> bool:
    """The process exists, is no zombie, and (guarding against pid reuse) its command line contains
    `expect`."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] in ("Z", "X"):
        return False
    return expect is None or expect in cmdline(pid)


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def namespace_pids(init_pid: int) -> list[int]:
    """Every live process (root-namespace pids) in the PID namespace whose init is `init_pid`."""
    ns = pid_namespace(init_pid)
    if ns is None or ns == pid_namespace(os.getpid()):
        return []  # never mistake the root namespace for a node's
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_namespace(int(entry)) == ns and is_alive(int(entry)):
            out.append(int(entry))
    return sorted(out)


def kill_namespace(init_pid: int, timeout: float = 15.0) -> list[int]:
    """SIGKILL the node's init: the kernel kills the whole PID namespace. Returns the pids that were
    in it, after waiting until none is alive (or `timeout`)."""
    pids = namespace_pids(init_pid)
    if not pids:
        return []
    try:
        os.kill(init_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_alive(p) for p in pids):
        time.sleep(0.1)
    return pids


# ---- HTTP ----------------------------------------------------------------------------------
def _get(url: str, token: str | None, timeout: float = 3) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, b""


def _token(path: str | None) -> str | None:
    return Path(path).read_text().strip() if path else None


def running(match: str) -> bool:
    """Some process visible here (in a node: that node's) has `match` in its command line."""
    return any(match in cmdline(int(e)) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid())


def wait_http(url: str, timeout: float, token_file: str | None = None, watch: str | None = None) -> str:
    """'' once `url` answers 200, else a one-line reason (timeout, or no process matching `watch`
    is left: the server died)."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        if watch and not running(watch):
            return f"no process '{watch}' is running: it exited before {url} answered"
        try:
            status, _ = _get(url, _token(token_file))
            if status == 200:
                return ""
            last = f"HTTP {status}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        time.sleep(0.5)
    return f"{url} did not answer 200 within {timeout:.0f} s (last: {last})"


def alive_nodes(dashboard: str, token_file: str | None) -> list[dict]:
    """The ALIVE nodes the Ray state API lists."""
    status, body = _get(f"{dashboard}/api/v0/nodes?limit=100&detail=true", _token(token_file), timeout=10)
    if status != 200:
        raise OSError(f"HTTP {status}")
    rows = json.loads(body)["data"]["result"]["result"]
    return [r for r in rows if r.get("state") == "ALIVE"]


def wait_nodes(dashboard: str, ips: list[str], timeout: float, token_file: str | None) -> str:
    """'' once exactly the nodes with these IPs are ALIVE, else a one-line reason."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            seen = sorted(r["node_ip"] for r in alive_nodes(dashboard, token_file))
            if seen == sorted(ips):
                return ""
            last = f"alive: {', '.join(seen) or 'none'}"
        except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
            last = str(getattr(err, "reason", err))
        time.sleep(0.5)
    return f"Ray nodes {', '.join(ips)} not all ALIVE within {timeout:.0f} s ({last})"


# ---- S3 --------------------------------------------------------------------------------------
def make_buckets(names: list[str], timeout: float = 60) -> None:
    """Create the buckets on the S3 endpoint of the environment (AWS_ENDPOINT_URL, credentials)."""
    import boto3
    from botocore.exceptions import ClientError, EndpointConnectionError

    s3 = boto3.client("s3")
    deadline = time.monotonic() + timeout
    while True:
        try:
            have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            break
        except (EndpointConnectionError, ClientError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    for name in names:
        if name not in have:
            s3.create_bucket(Bucket=name)


# ---- a Python handle on bed.sh -------------------------------------------------------------
@dataclass
class Bed:
    """Drive infra/local/bed.sh with a given state dir (tests, scripts)."""

    state_dir: Path
    name: str = "lrbed"
    python: str = sys.executable

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "LINREP_BED_DIR": str(self.state_dir), "LINREP_BED_NAME": self.name,
                "LINREP_PYTHON": self.python}

    def namespace(self, node: str) -> str:
        return f"{self.name}-{node}"

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=HERE.parents[1])

    def exec(self, node: str, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run("exec", node, *cmd, timeout=timeout)

    def init_pid(self, node: str) -> int | None:
        f = self.state_dir / "run" / f"{node}.pid"
        return int(f.read_text().strip()) if f.exists() else None

    def node_pids(self, node: str) -> list[int]:
        pid = self.init_pid(node)
        return namespace_pids(pid) if pid else []

    def config(self) -> dict[str, str]:
        """The addresses bed.sh wrote (bed.json)."""
        return json.loads((self.state_dir / "bed.json").read_text())


# ---- CLI used by bed.sh --------------------------------------------------------------------
def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bedlib.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init").add_argument("node")
    sub.add_parser("child-of").add_argument("pid", type=int)
    al = sub.add_parser("alive")
    al.add_argument("pid", type=int)
    al.add_argument("--expect", default=None)
    nsp = sub.add_parser("ns-pids")
    nsp.add_argument("pid", type=int)
    nsp.add_argument("--match", default=None, help="only processes whose command line contains this")
    sub.add_parser("kill-ns").add_argument("pid", type=int)
    wh = sub.add_parser("wait-http")
    wh.add_argument("url")
    wh.add_argument("--timeout", type=float, default=120)
    wh.add_argument("--token-file", default=None)
    wh.add_argument("--watch", default=None, help="fail early when no process has this in its command line")
    wn = sub.add_parser("wait-nodes")
    wn.add_argument("dashboard")
    wn.add_argument("ips", nargs="+")
    wn.add_argument("--timeout", type=float, default=120)
    wn.add_argument("--token-file", default=None)
    sub.add_parser("buckets").add_argument("names", nargs="+")
    sub.add_parser("token")
    a = p.parse_args(argv)

    if a.cmd == "init":
        return run_init(a.node)
    if a.cmd == "child-of":
        child = child_of(a.pid)
        if child is None:
            return 1
        print(child)
    elif a.cmd == "alive":
        return 0 if is_alive(a.pid, a.expect) else 1
    elif a.cmd == "ns-pids":
        pids = [p for p in namespace_pids(a.pid) if a.match is None or a.match in cmdline(p)]
        print(" ".join(map(str, pids)))
        return 0 if pids else 1
    elif a.cmd == "kill-ns":
        gone = kill_namespace(a.pid)
        print(f"killed {len(gone)} process(es)")
    elif a.cmd in ("wait-http", "wait-nodes"):
        reason = (wait_http(a.url, a.timeout, a.token_file, a.watch) if a.cmd == "wait-http"
                  else wait_nodes(a.dashboard, a.ips, a.timeout, a.token_file))
        if reason:
            print(reason, file=sys.stderr)
            return 1
    elif a.cmd == "buckets":
        make_buckets(a.names)
    elif a.cmd == "token":
        import secrets

        print(secrets.token_hex(32))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
