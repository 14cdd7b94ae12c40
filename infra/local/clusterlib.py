"""Process and port helpers for infra/local/cluster.sh, and a Python handle on that script.

cluster.sh calls this file as a small CLI (`python clusterlib.py COMMAND ...`) for the parts that
are fragile in bash: starting a process in its own session (so its whole process group can be
stopped by one id), waiting for an HTTP endpoint while watching the process, stopping a process
tree, and reading the socket table. Tests and scripts use `LocalCluster` to drive cluster.sh.

Only the standard library, psutil (a project dependency) and trainer/files.py (the project's one
atomic-write helper, for `write-json`) are used.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

SCRIPT = Path(__file__).resolve().parent / "cluster.sh"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


# ---- ports ---------------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free on 127.0.0.1 right now (held open together, so distinct)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int) -> bool:
    """True when nothing listens on `port` on any IPv4 address (a bind to 0.0.0.0 would conflict)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ---- processes -----------------------------------------------------------------------------
def spawn(log: Path, cmd: list[str]) -> int:
    """Start `cmd` in a new session (pid == process group id), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    return proc.pid


def is_alive(pid: int, expect: str | None = None) -> bool:
    """The process exists, is not a zombie, and (guarding against pid reuse) its command line
    contains `expect`."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return expect is None or expect in " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def process_tree(pid: int) -> list[psutil.Process]:
    """The session leader `pid`, every process in its process group, and all their descendants.

    Ray gives each worker and job driver its own process group, so the group alone misses them;
    descendants catch those while their parents are still alive.
    """
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pid:
                found[proc.pid] = proc
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    try:
        found.setdefault(pid, psutil.Process(pid))
    except psutil.NoSuchProcess:
        pass
    for proc in list(found.values()):
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def stop_tree(pid: int, timeout: float = 20.0) -> int:
    """SIGTERM the tree of `pid` (see process_tree), wait up to `timeout`, then SIGKILL what is left.
    Returns the number of processes that had to be killed."""
    procs = process_tree(pid)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    # Children forked while we waited (e.g. a respawned worker) are caught by a second sweep.
    leftovers = {p.pid: p for p in alive}
    for proc in process_tree(pid) if is_alive(pid) else []:
        leftovers.setdefault(proc.pid, proc)
    for proc in leftovers.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(leftovers.values()), timeout=5)
    return len(leftovers)


def listeners(pids: list[int]) -> list[tuple[str, int, int, str]]:
    """(ip, port, pid, name) of every listening TCP socket owned by the trees of `pids`."""
    rows = []
    for root in pids:
        for proc in process_tree(root):
            try:
                conns = proc.net_connections(kind="inet")
                name = proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN:
                    rows.append((c.laddr.ip, c.laddr.port, proc.pid, name))
    return sorted(set(rows))


# ---- HTTP ----------------------------------------------------------------------------------
def wait_http(url: str, timeout: float, pid: int | None = None, token_file: Path | None = None) -> str:
    """Poll `url` until it answers 200; '' on success, else a one-line reason (timeout, or the
    watched process died first)."""
    headers = {}
    if token_file is not None:
        headers["Authorization"] = f"Bearer {token_file.read_text().strip()}"
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if pid is not None and not is_alive(pid):
            return f"process {pid} exited before {url} answered"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as resp:
                if resp.status == 200:
                    return ""
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        time.sleep(0.5)
    return f"{url} did not answer 200 within {timeout:.0f} s (last: {last})"


# ---- a Python handle on cluster.sh ---------------------------------------------------------
@dataclass
class LocalCluster:
    """Drive infra/local/cluster.sh with a given state dir and ports (tests, scripts)."""

    state_dir: Path
    ray_port: int
    dashboard_port: int
    mlflow_port: int
    python: str = sys.executable
    num_cpus: int | None = None

    @classmethod
    def on_free_ports(cls, state_dir: Path, **kwargs) -> "LocalCluster":
        ray_port, dash, mlflow = free_ports(3)
        return cls(Path(state_dir), ray_port, dash, mlflow, **kwargs)

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "LINREP_CLUSTER_DIR": str(self.state_dir), "LINREP_RAY_PORT": str(self.ray_port),
               "LINREP_DASHBOARD_PORT": str(self.dashboard_port), "LINREP_MLFLOW_PORT": str(self.mlflow_port),
               "LINREP_PYTHON": self.python}
        if self.num_cpus is not None:
            env["LINREP_NUM_CPUS"] = str(self.num_cpus)
        return env

    def run(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def token_file(self) -> Path:
        return self.state_dir / "auth_token"

    def pids(self) -> dict[str, int]:
        """{'ray': pid, 'mlflow': pid} from the pid files that exist."""
        out = {}
        for name in ("ray", "mlflow"):
            f = self.state_dir / f"{name}.pid"
            if f.exists():
                out[name] = int(f.read_text().strip())
        return out


# ---- CLI used by cluster.sh ----------------------------------------------------------------
def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterlib.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("free-ports").add_argument("count", type=int)
    sub.add_parser("port-free").add_argument("port", type=int)
    sp = sub.add_parser("spawn")
    sp.add_argument("log", type=Path)
    sp.add_argument("argv", nargs=argparse.REMAINDER)
    al = sub.add_parser("alive")
    al.add_argument("pid", type=int)
    al.add_argument("--expect", default=None)
    st = sub.add_parser("stop")
    st.add_argument("pid", type=int)
    st.add_argument("--timeout", type=float, default=20.0)
    wh = sub.add_parser("wait-http")
    wh.add_argument("url")
    wh.add_argument("--timeout", type=float, default=90.0)
    wh.add_argument("--pid", type=int, default=None)
    wh.add_argument("--token-file", type=Path, default=None)
    ls = sub.add_parser("listeners")
    ls.add_argument("pids", type=int, nargs="+")
    sub.add_parser("token")
    wj = sub.add_parser("write-json")
    wj.add_argument("path", type=Path)
    wj.add_argument("pairs", nargs="*", help="key=value")
    a = p.parse_args(argv)

    if a.cmd == "free-ports":
        print(" ".join(map(str, free_ports(a.count))))
    elif a.cmd == "port-free":
        return 0 if port_is_free(a.port) else 1
    elif a.cmd == "spawn":
        cmd = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
        print(spawn(a.log, cmd))
    elif a.cmd == "alive":
        return 0 if is_alive(a.pid, a.expect) else 1
    elif a.cmd == "stop":
        killed = stop_tree(a.pid, a.timeout)
        if killed:
            print(f"  {killed} process(es) did not stop on SIGTERM within {a.timeout:.0f} s: killed")
    elif a.cmd == "wait-http":
        reason = wait_http(a.url, a.timeout, a.pid, a.token_file)
        if reason:
            print(reason, file=sys.stderr)
            return 1
    elif a.cmd == "listeners":
        for ip, port, pid, name in listeners(a.pids):
            print(f"  {ip}:{port}  pid {pid} ({name})")
    elif a.cmd == "token":
        import secrets

        print(secrets.token_hex(32))  # the format `ray get-auth-token --generate` writes
    elif a.cmd == "write-json":
        data = {}
        for pair in a.pairs:
            k, _, v = pair.partition("=")
            data[k] = int(v) if v.isdigit() else v
        from trainer.files import write_json_atomic

        write_json_atomic(a.path, data, sort_keys=False)
    return 0


if __name__ == "__main__":
    # cluster.sh runs this file as a script: put the repository root on the path for trainer.files
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(_main(sys.argv[1:]))
