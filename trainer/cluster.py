"""What a run asks of a Ray cluster, decided from plain data (no Ray here: trainer/run.py reads
`ray.nodes()` and hands the nodes in).

- `tracking_uri_for(uri, nodes, driver_ip)`: the MLflow URI every node reaches. A loopback URI
  (http://127.0.0.1:5000, localhost, a sqlite file, a local path) means "this machine" to each
  node that uses it: on a multi-node cluster workers and probe actors on other nodes would log to
  themselves and their metrics would be buffered, then dropped. A loopback http(s) URI is
  rewritten to the head's address when the driver runs on the head and the server answers there;
  anything else is refused before the MLflow run opens.
- `run_demand(cfg)` and `unfit_reason(demand, nodes)`: the bundles a run reserves (one per Ray
  Train worker, one for the probe actor; the Train controller reserves none: Ray 2.60 starts it
  with num_cpus=0) packed onto the nodes, each bundle on one node, as Ray places them.
- `ds_accelerator_env(use_gpu)`: DS_ACCELERATOR for the workers.

An autoscaling cluster may hold fewer nodes now than it can grow to: with LINREP_AUTOSCALING=1
(the shipped cluster definitions set it on the head) a run that does not fit the nodes present is
let through with a warning (the autoscaler adds nodes for the pending bundles), and a loopback
tracking URI is handled as on a multi-node cluster.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from trainer.config import Config
from trainer.errors import UserError

AUTOSCALING_ENV = "LINREP_AUTOSCALING"
TRACKING_FIX = "set MLFLOW_TRACKING_URI to an address every node reaches, e.g. http://<head-ip>:5000"
CONNECT_TIMEOUT_S = 2.0
EPS = 1e-9


@dataclass(frozen=True)
class Node:
    ip: str
    cpus: float
    gpus: float = 0.0
    is_head: bool = False


def nodes_from_ray(ray_nodes: list[dict]) -> list[Node]:
    """The alive nodes of `ray.nodes()` (a list of dicts), as Nodes."""
    out = []
    for n in ray_nodes:
        if not n.get("Alive", n.get("alive", False)):
            continue
        res = n.get("Resources", {})
        out.append(Node(n["NodeManagerAddress"], float(res.get("CPU", 0)), float(res.get("GPU", 0)),
                        "node:__internal_head__" in res))
    return out


def autoscaling() -> bool:
    return os.environ.get(AUTOSCALING_ENV, "").strip().lower() in ("1", "true", "yes")


# ---- tracking --------------------------------------------------------------------------------
def is_loopback_host(host: str | None) -> bool:
    if not host:
        return True
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return addr.is_loopback or addr.is_unspecified


def is_local_store(uri: str) -> bool:
    """A store only this machine opens: a sqlite/file URI or a bare path."""
    scheme = urlsplit(uri).scheme.lower()
    return scheme in ("", "file") or scheme.startswith("sqlite") or (len(scheme) == 1 and uri[1:2] == ":")


def tcp_answers(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def tracking_uri_for(uri: str, nodes: list[Node], driver_ip: str, *, grows: bool = False,
                     answers: Callable[[str, int], bool] = tcp_answers) -> str:
    """The tracking URI every node reaches: `uri` itself, or a loopback http(s) URI rewritten to the
    head's address. UserError (one line, naming the fix) when no such URI can be made.

    grows: the cluster autoscales (nodes may join later); answers(host, port): does a server listen there."""
    ips = {n.ip for n in nodes}
    # one node with the driver on it, or nodes that all live on this machine (pinned to loopback,
    # like infra/local/cluster.sh's head, whatever address the driver reports for itself)
    single = not grows and ((len(nodes) <= 1 and driver_ip in ips) or all(is_loopback_host(ip) for ip in ips))
    parts = urlsplit(uri)
    if single:
        return uri  # one node: loopback means the same machine to everyone (today's local runs)
    shape = "an autoscaling" if grows else f"this {len(nodes)}-node"
    if is_local_store(uri):
        raise UserError(f"MLflow store {uri} is a file on this machine that Ray workers on other nodes of "
                        f"{shape} cluster cannot open: {TRACKING_FIX}")
    if not is_loopback_host(parts.hostname):
        return uri
    head = next((n for n in nodes if n.is_head), None)
    if parts.scheme not in ("http", "https") or head is None or head.ip != driver_ip or is_loopback_host(head.ip):
        where = "" if head is None or head.ip == driver_ip else f" (the driver runs on {driver_ip}, not the head)"
        raise UserError(f"MLflow tracking URI {_redact(uri)} means each node itself on {shape} cluster{where}: "
                        f"{TRACKING_FIX}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    rewritten = urlunsplit(parts._replace(netloc=_replace_host(parts, head.ip)))
    if not answers(head.ip, port):
        raise UserError(f"MLflow tracking URI {_redact(uri)} means each node itself on {shape} cluster, and "
                        f"nothing answers at the head's {head.ip}:{port} (is the server bound to 127.0.0.1?): "
                        f"{TRACKING_FIX}")
    return rewritten


def _replace_host(parts, host: str) -> str:
    userinfo = parts.netloc.rpartition("@")[0]
    h = f"[{host}]" if ":" in host else host
    hostport = f"{h}:{parts.port}" if parts.port else h
    return f"{userinfo}@{hostport}" if userinfo else hostport


def _redact(uri: str) -> str:
    from trainer.config import redact_uri

    return redact_uri(uri)


# ---- resources -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Demand:
    """One run's reservations: `workers` bundles of (cpus, gpus) and the probe actor's."""

    name: str
    workers: int
    cpus: float
    gpus: float
    actor_cpus: float = 0.0
    actor_gpus: float = 0.0

    def bundles(self) -> list[tuple[float, float]]:
        out = [(self.cpus, self.gpus)] * self.workers
        if self.actor_cpus or self.actor_gpus:
            out.append((self.actor_cpus, self.actor_gpus))
        return out

    def total(self) -> tuple[float, float]:
        b = self.bundles()
        return sum(c for c, _ in b), sum(g for _, g in b)


def run_demand(cfg: Config, name: str | None = None) -> Demand:
    """What `linrep train` reserves: ScalingConfig gives each worker run.cpus_per_worker CPUs and,
    with run.use_gpu, one GPU; the probe actor (when probes are on) probe.actor_cpus/actor_gpus."""
    r, p = cfg.run, cfg.probe
    return Demand(name or cfg.preset or cfg.run_name(), r.workers, r.cpus_per_worker, 1.0 if r.use_gpu else 0.0,
                  p.actor_cpus if p.enabled else 0.0, p.actor_gpus if p.enabled else 0.0)


def pack(bundles: list[tuple[float, float]], nodes: list[Node]) -> bool:
    """Whether every bundle fits on one node (first fit, largest bundles first)."""
    free = [[n.cpus, n.gpus] for n in nodes]
    for c, g in sorted(bundles, key=lambda b: (b[1], b[0]), reverse=True):
        slot = next((f for f in free if f[0] + EPS >= c and f[1] + EPS >= g), None)
        if slot is None:
            return False
        slot[0] -= c
        slot[1] -= g
    return True


def copies_that_fit(demand: Demand, nodes: list[Node], limit: int) -> int:
    """How many copies of `demand` (sweep trials) the nodes hold at once, up to `limit`."""
    k = 0
    while k < limit and pack(demand.bundles() * (k + 1), nodes):
        k += 1
    return k


def unfit_reason(demand: Demand, nodes: list[Node], copies: int = 1, fix: str = "") -> str | None:
    """None when `copies` runs of `demand` fit the nodes; else one line naming what is missing."""
    if pack(demand.bundles() * copies, nodes):
        return None
    cpus, gpus = demand.total()
    have_c, have_g = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    times = f"{copies} x (" if copies > 1 else ""
    end = ")" if copies > 1 else ""
    if gpus * copies > have_g + EPS:
        need = _need(demand, "GPU", demand.gpus, demand.actor_gpus)
        return (f"{demand.name} needs {times}{need}{end} = {_g(gpus * copies)} GPUs; the cluster has "
                f"{_g(have_g)} GPUs{_shape(nodes, 'gpus')}: {fix or _fix(demand, 'GPU')}")
    if cpus * copies > have_c + EPS:
        need = _need(demand, "CPU", demand.cpus, demand.actor_cpus)
        return (f"{demand.name} needs {times}{need}{end} = {_g(cpus * copies)} CPUs; the cluster has "
                f"{_g(have_c)} CPUs{_shape(nodes, 'cpus')}: {fix or _fix(demand, 'CPU')}")
    worker = f"{_g(demand.cpus)} CPUs" + (f" + {_g(demand.gpus)} GPU" if demand.gpus else "")
    return (f"{demand.name}: the cluster has {_g(have_c)} CPUs and {_g(have_g)} GPUs in all, but its nodes "
            f"({_nodes(nodes)}) cannot each hold their share of {times}{demand.workers} workers x {worker}"
            f"{_actor(demand)}{end} (each reservation must fit on one node): {fix or _fix(demand, '')}")


def _need(d: Demand, unit: str, per_worker: float, actor: float) -> str:
    s = f"{d.workers} workers x {_g(per_worker)} {unit}"
    return s + (f" + a probe actor with {_g(actor)} {unit}" if actor else "")


def _actor(d: Demand) -> str:
    if not (d.actor_cpus or d.actor_gpus):
        return ""
    return f" + a probe actor with {_g(d.actor_cpus)} CPUs / {_g(d.actor_gpus)} GPU"


def _fix(d: Demand, unit: str) -> str:
    fix = "lower run.workers" if unit == "GPU" else "lower run.workers or run.cpus_per_worker"
    if d.actor_gpus and unit != "CPU":
        fix += " or set probe.actor_gpus=0"
    if d.actor_cpus and unit != "GPU":
        fix += " or lower probe.actor_cpus"
    return fix


def _shape(nodes: list[Node], attr: str) -> str:
    having = [getattr(n, attr) for n in nodes if getattr(n, attr) > 0]
    if not having:
        return f" ({len(nodes)} node{'s' if len(nodes) != 1 else ''})"
    if len(set(having)) == 1:
        without = len(nodes) - len(having) if attr == "cpus" else 0  # CPU-only nodes are no news for GPUs
        more = f" + {without} node{'s' if without > 1 else ''} with none" if without else ""
        return f" ({len(having)} node{'s' if len(having) > 1 else ''} x {_g(having[0])}{more})"
    return f" ({_nodes(nodes)})"


def _nodes(nodes: list[Node]) -> str:
    return ", ".join(f"{_g(n.cpus)} CPUs/{_g(n.gpus)} GPUs" for n in nodes) or "no nodes"


def _g(x: float) -> str:
    return f"{x:g}" if not math.isclose(x, round(x)) else str(int(round(x)))


# ---- DeepSpeed -------------------------------------------------------------------------------
def ds_accelerator_env(use_gpu: bool, driver_env: dict[str, str] | None = None) -> dict[str, str]:
    """DS_ACCELERATOR for Ray Train workers: `cpu` for CPU runs; on GPU workers DeepSpeed picks
    cuda itself, so nothing is set (a driver-side DS_ACCELERATOR=cpu, e.g. a laptop's or the
    tests', must not pin GPU workers to the CPU); an explicit other accelerator passes through."""
    if not use_gpu:
        return {"DS_ACCELERATOR": "cpu"}
    value = (driver_env if driver_env is not None else os.environ).get("DS_ACCELERATOR", "")
    return {"DS_ACCELERATOR": value} if value and value != "cpu" else {}


def require_fit(demand: Demand, nodes: list[Node], *, copies: int = 1, fix: str = "", grows: bool = False) -> None:
    """UserError (exit 2) naming what is missing when the run cannot fit; on an autoscaling cluster
    a warning instead (the autoscaler adds nodes for bundles Ray cannot place yet)."""
    reason = unfit_reason(demand, nodes, copies, fix)
    if reason is None:
        return
    if grows:
        import sys

        print(f"warning: {reason} (now; {AUTOSCALING_ENV}=1: waiting for the autoscaler)", file=sys.stderr, flush=True)
        return
    # a machine's own Ray (one node with CPUs) never grows: the hint is for cluster heads
    local = len(nodes) == 1 and nodes[0].cpus > 0
    raise UserError(reason if local else f"{reason} (an autoscaling cluster: set {AUTOSCALING_ENV}=1)")
