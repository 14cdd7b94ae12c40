"""Cluster paths: the tracking URI every node reaches, runs that fit the cluster (refused before
they start when they cannot), the DeepSpeed accelerator of the workers, the presets against the
shipped cluster definitions, and every `linrep ...` command the cluster files and docs show,
resolved by the real CLI up to where it would start Ray."""

from __future__ import annotations

import re
import shlex
import socket
import time
from pathlib import Path

import pytest
import yaml

from linrep.dryrun import resolve_command
from tests.conftest import REPO
from trainer.cluster import (TRACKING_FIX, Demand, Node, copies_that_fit, ds_accelerator_env, run_demand,
                             tcp_answers, tracking_uri_for, unfit_reason)
from trainer.config import list_presets, resolve
from trainer.errors import UserError

HEAD, W1, W2 = "10.0.0.1", "10.0.0.2", "10.0.0.3"
THREE = [Node(HEAD, 0, 0, True), Node(W1, 8, 1), Node(W2, 8, 1)]


def never(host, port):  # a one-node decision must not probe the network
    raise AssertionError(f"probed {host}:{port}")


# ---- part 3: tracking from every node --------------------------------------------------------
@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "http://localhost:5000", "sqlite:////tmp/x/mlflow.db",
                                 "/tmp/mlruns", "http://10.9.9.9:5000"])
def test_one_node_keeps_the_tracking_uri(uri):
    assert tracking_uri_for(uri, [Node("127.0.0.1", 2, 0, True)], "127.0.0.1", answers=never) == uri
    assert tracking_uri_for(uri, [Node("10.1.2.3", 2, 0, True)], "10.1.2.3", answers=never) == uri
    # a head pinned to loopback (infra/local/cluster.sh) is this machine, whatever the driver reports
    assert tracking_uri_for(uri, [Node("127.0.0.1", 2, 0, True)], "192.0.2.2", answers=never) == uri


@pytest.mark.parametrize("uri, expected, port", [
    ("http://127.0.0.1:5000", f"http://{HEAD}:5000", 5000),
    ("http://localhost:5000/", f"http://{HEAD}:5000/", 5000),
    ("https://user:pw@[::1]:8443/mlflow", f"https://user:pw@{HEAD}:8443/mlflow", 8443),
    ("http://0.0.0.0", f"http://{HEAD}", 80),
    ("http://mlflow.linrep.svc.cluster.local:5000", "http://mlflow.linrep.svc.cluster.local:5000", None),
])
def test_multi_node_rewrites_loopback_http_to_the_head(uri, expected, port):
    probed = []
    answers = lambda host, port: probed.append((host, port)) or True  # noqa: E731
    assert tracking_uri_for(uri, THREE, HEAD, answers=answers) == expected
    assert probed == ([(HEAD, port)] if port else [])  # the head is probed before a rewrite


@pytest.mark.parametrize("uri, nodes, driver, answers, match", [
    ("sqlite:////home/me/mlruns/mlflow.db", THREE, HEAD, True, "file on this machine"),
    ("/home/me/mlruns", THREE, HEAD, True, "file on this machine"),
    ("file:///home/me/mlruns", THREE, HEAD, True, "file on this machine"),
    ("http://127.0.0.1:5000", THREE, HEAD, False, "nothing answers at the head's 10.0.0.1:5000"),
    ("http://127.0.0.1:5000", THREE, W1, True, "the driver runs on 10.0.0.2, not the head"),
    # the driver is not on the only node (a laptop driver): loopback means the laptop
    ("http://127.0.0.1:5000", [Node(HEAD, 8, 0, True)], "192.168.1.5", True, "not the head"),
    ("postgresql://mlflow@localhost/mlflow", THREE, HEAD, True, "means each node itself"),
])
def test_multi_node_refuses_a_store_other_nodes_cannot_reach(uri, nodes, driver, answers, match):
    with pytest.raises(UserError, match=match) as err:
        tracking_uri_for(uri, nodes, driver, answers=lambda h, p: answers)
    assert TRACKING_FIX in str(err.value) and "\n" not in str(err.value)


def test_an_autoscaling_head_alone_is_handled_as_multi_node():
    head = [Node(HEAD, 0, 0, True)]
    assert tracking_uri_for("http://127.0.0.1:5000", head, HEAD, grows=True,
                            answers=lambda h, p: True) == f"http://{HEAD}:5000"
    with pytest.raises(UserError, match="autoscaling"):
        tracking_uri_for("sqlite:////tmp/m.db", head, HEAD, grows=True)


def test_tcp_answers_within_the_timeout():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert tcp_answers("127.0.0.1", port)
    t0 = time.monotonic()
    assert not tcp_answers("127.0.0.1", port)  # closed now: refused at once
    assert time.monotonic() - t0 < 2.5


# ---- part 4: resources -----------------------------------------------------------------------
def test_ds_accelerator_follows_use_gpu():
    assert ds_accelerator_env(False, {}) == {"DS_ACCELERATOR": "cpu"}
    assert ds_accelerator_env(False, {"DS_ACCELERATOR": "cuda"}) == {"DS_ACCELERATOR": "cpu"}
    # GPU workers: DeepSpeed picks cuda itself; a driver-side cpu (tests, laptops) must not pin them
    assert ds_accelerator_env(True, {"DS_ACCELERATOR": "cpu"}) == {}
    assert ds_accelerator_env(True, {}) == {}
    assert ds_accelerator_env(True, {"DS_ACCELERATOR": "xpu"}) == {"DS_ACCELERATOR": "xpu"}


def test_the_trainer_hands_the_workers_that_accelerator(monkeypatch, tmp_path):
    """make_trainer's worker env (Ray's public RunConfig.worker_runtime_env), with the driver on cpu."""
    from trainer.run import RunHandle, make_trainer
    from trainer.storage import locate

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for use_gpu, expected in ((True, None), (False, "cpu")):
        cfg = resolve("synthetic-fast", [f"run.use_gpu={str(use_gpu).lower()}"])
        trainer = make_trainer(RunHandle(cfg, "k", locate(str(tmp_path / "k")), None, None))
        assert trainer.run_config.worker_runtime_env["env_vars"].get("DS_ACCELERATOR") == expected


def test_demand_message_names_what_is_missing():
    eight = [Node(HEAD, 0, 0, True)] + [Node(f"10.0.1.{i}", 8, 1) for i in range(8)]
    cfg = resolve("imagenet-resnet50", ["probe.actor_gpus=0.5", "run.workers=8"])
    assert unfit_reason(run_demand(cfg), eight) == (
        "imagenet-resnet50 needs 8 workers x 1 GPU + a probe actor with 0.5 GPU = 8.5 GPUs; "
        "the cluster has 8 GPUs (8 nodes x 1): lower run.workers or set probe.actor_gpus=0")
    assert unfit_reason(run_demand(cfg), eight + [Node("10.0.1.9", 8, 1)]) is None
    # totals fit, nodes do not: a worker's bundle must fit on one node
    split = [Node(HEAD, 3, 0, True), Node(W1, 3, 0)]
    assert "must fit on one node" in unfit_reason(Demand("x", 1, 4, 0), split)
    assert copies_that_fit(Demand("x", 1, 3, 0), split, 10) == 2


def _k8s_nodes(spec: dict) -> list[Node]:
    """A RayCluster spec at full scale: the head + every worker group at maxReplicas."""
    def node(params: dict, container: dict, head: bool) -> Node:
        limits = container.get("resources", {}).get("limits", {})
        cpus = float(params.get("num-cpus", _cpu(limits.get("cpu", 0))))
        gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        return Node("head" if head else "worker", cpus, gpus, head)

    head = spec["headGroupSpec"]
    out = [node(head.get("rayStartParams", {}), head["template"]["spec"]["containers"][0], True)]
    for g in spec["workerGroupSpecs"]:
        out += [node(g.get("rayStartParams", {}), g["template"]["spec"]["containers"][0], False)] * g["maxReplicas"]
    return out


def _cpu(value) -> float:
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


# What Ray detects on the launcher's instance types (vCPUs, GPUs), from AWS's instance tables.
INSTANCE_TYPES = {"m5.2xlarge": (8, 0), "g5.2xlarge": (8, 1)}


def _launcher_nodes(cfg: dict) -> list[Node]:
    out = []
    for name, t in cfg["available_node_types"].items():
        cpus, gpus = INSTANCE_TYPES[t["node_config"]["InstanceType"]]
        res = t.get("resources", {})
        n = Node(name, float(res.get("CPU", cpus)), float(res.get("GPU", gpus)), name == cfg["head_node_type"])
        out += [n] * (1 if n.is_head else t.get("max_workers", cfg["max_workers"]))
    return out


def shipped_clusters() -> dict[str, list[Node]]:
    out = {}
    for path in sorted((REPO / "infra" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {})
            if doc and doc.get("kind") in ("RayCluster", "RayJob"):
                out[path.name] = _k8s_nodes(spec if doc["kind"] == "RayCluster" else spec["rayClusterSpec"])
    launcher = yaml.safe_load((REPO / "infra" / "launcher" / "aws-gpu.yaml").read_text())
    out["aws-gpu.yaml"] = _launcher_nodes(launcher)
    return out


def test_shipped_clusters_parse():
    clusters = shipped_clusters()
    assert set(clusters) == {"raycluster.yaml", "rayjob-sweep.yaml", "aws-gpu.yaml"}
    for nodes in clusters.values():
        assert sum(n.is_head for n in nodes) == 1 and sum(n.gpus for n in nodes) == 9


def _gpu_presets() -> list[str]:
    return [p for p in list_presets() if resolve(p, []).run.use_gpu]


def test_gpu_presets_and_sweep_specs_fit_a_shipped_cluster():
    from tune.spec import build_plan, load_spec
    from tune.sweep import trial_demand

    clusters = shipped_clusters()
    assert {"imagenet-resnet50", "imagenet-vit-b16"} <= set(_gpu_presets())
    for preset in _gpu_presets():
        reasons = [unfit_reason(run_demand(resolve(preset, [])), nodes) for nodes in clusters.values()]
        assert None in reasons, f"{preset} fits no shipped cluster: {reasons}"
    for spec_file in sorted((REPO / "tune" / "specs").glob("*.yaml")):
        spec, text, path = load_spec(str(spec_file))
        plan = build_plan(spec, spec_text=text, where=str(path))
        copies = min(plan.max_concurrent or 1, len(plan.trials))
        reasons = [unfit_reason(trial_demand(plan), nodes, copies) for nodes in clusters.values()]
        assert None in reasons, f"{spec_file.name} fits no shipped cluster: {reasons}"


def test_one_node_run_keeps_its_uri_and_an_unfit_run_is_refused_before_it_opens(ray_local, tmp_path):
    """A real local Ray (one node): check_cluster changes nothing; a run asking for more CPUs than
    the node has is refused in one line before Ray Train starts and before its MLflow run opens."""
    from probes.pipeline import train_and_probe
    from trainer.run import check_cluster, cluster_nodes

    nodes, driver_ip = cluster_nodes()
    assert len(nodes) == 1 and nodes[0].is_head and nodes[0].ip == driver_ip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ok = resolve("synthetic-fast", [f"tracking.uri={uri}"])
    assert check_cluster(ok) == uri
    big = resolve("synthetic-fast", [f"tracking.uri={uri}", "run.workers=4", f"run.storage={tmp_path / 'runs'}"])
    with pytest.raises(UserError, match=r"needs 4 workers x 1 CPU = 4 CPUs; the cluster has 2 CPUs \(1 node x 2\)"):
        train_and_probe(big)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


# ---- part 5: every shipped `linrep ...` command ----------------------------------------------
PLACEHOLDERS = {"<token>": "/tmp/token", "<bucket>": "bucket"}
LINREP_LINE = re.compile(r"^(?:\$\s*)?linrep\s")


def _commands_in_lines(lines: list[str]) -> list[str]:
    """`linrep ...` command lines (backslash continuations joined, trailing comments dropped)."""
    joined, buf = [], ""
    for line in lines:
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        joined.append(buf.strip())
        buf = ""
    out = []
    for line in joined:
        if LINREP_LINE.match(line):
            line = re.sub(r"\s+#.*$", "", line.lstrip("$ "))
            for key, value in PLACEHOLDERS.items():
                line = line.replace(key, value)
            out.append(line)
    return out


def shipped_commands() -> list[tuple[str, str]]:
    """(where, command) for every linrep command in the cluster files and docs."""
    out = []
    yamls = [*sorted((REPO / "infra" / "k8s").glob("*.yaml")), *sorted((REPO / "infra" / "launcher").glob("*.yaml")),
             *sorted((REPO / "tune" / "specs").glob("*.yaml"))]
    for path in yamls:
        rel = str(path.relative_to(REPO))
        comments = [re.sub(r"^\s*#\s?", "", l) for l in path.read_text().splitlines() if l.lstrip().startswith("#")]
        out += [(f"{rel}#comment", c) for c in _commands_in_lines(comments)]
        for doc in yaml.safe_load_all(path.read_text()):
            entry = ((doc or {}).get("spec") or {}).get("entrypoint") if isinstance(doc, dict) else None
            if entry:
                out.append((f"{rel}:entrypoint", entry))
    for doc in ("README.md", "infra/README.md"):
        text = (REPO / doc).read_text()
        for block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
            if block[0] in ("", "bash", "sh", "console"):
                out += [(doc, c) for c in _commands_in_lines(block[1].splitlines())]
    return out


def _cases():
    for where, cmd in shipped_commands():
        yield pytest.param(where, cmd, id=f"{where}: {cmd[:60]}")


def test_the_extraction_finds_the_shipped_commands():
    wheres = {w for w, _ in shipped_commands()}
    assert {"infra/k8s/rayjob-sweep.yaml:entrypoint", "infra/k8s/raycluster.yaml#comment",
            "infra/launcher/aws-gpu.yaml#comment", "infra/README.md"} <= wheres
    assert len(shipped_commands()) >= 8


@pytest.mark.parametrize("where, command", list(_cases()))
def test_every_shipped_command_is_accepted(where, command):
    argv = shlex.split(command)[1:]
    try:
        resolve_command(argv)
    except SystemExit as err:
        pytest.fail(f"{where}: `{command}` is refused by the CLI's parser (exit {err.code})")
