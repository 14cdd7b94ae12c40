"""infra/: the cluster-launcher YAML against the schema the ray package ships, the KubeRay and
MLflow manifests, the Dockerfile against the Makefile's install, and infra/local/cluster.sh for
real (a Ray head and an MLflow server that listen on 127.0.0.1 only, idempotent, leave nothing
behind)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import psutil
import pytest
import yaml

from infra.local.clusterlib import LOOPBACK, LocalCluster, listeners, process_tree
from tests.conftest import REPO

INFRA = REPO / "infra"
K8S = INFRA / "k8s"
LAUNCHER = INFRA / "launcher" / "aws-gpu.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"


# ---- Ray cluster launcher ------------------------------------------------------------------
def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_yaml_validates_against_rays_schema():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    schema = _ray_schema()
    jsonschema.validate(cfg, schema)
    # the schema bites: the same file with a misspelt key or a wrong type is rejected
    for broken in ({**cfg, "max_worker": 8}, {**cfg, "max_workers": "eight"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
    # and Ray's own loader (defaults for the provider filled in) accepts it
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_launcher_keeps_the_dashboard_local_and_wires_mlflow():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "mlflow server" in head
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    assert cfg["docker"]["image"] == _k8s_image()


# ---- KubeRay and MLflow manifests ----------------------------------------------------------
def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _all_docs() -> list[dict]:
    return [d for f in sorted(K8S.glob("*.yaml")) if f.name != "kustomization.yaml" for d in _docs(f.name)]


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _ray_groups(spec: dict) -> list[tuple[dict, dict]]:
    """(group spec, its main container) for the head and every worker group."""
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [(g, g["template"]["spec"]["containers"][0]) for g in groups]


def _k8s_image() -> str:
    (rc,) = _docs("raycluster.yaml")
    return rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_every_manifest_parses_and_names_its_kind_and_namespace():
    docs = _all_docs()
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "RayJob", "Deployment", "Service", "StatefulSet", "NetworkPolicy",
            "PersistentVolumeClaim", "Namespace"} <= kinds
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "linrep", d["metadata"]["name"]
    kustom = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kustom["resources"]:
        assert (K8S / res).is_file(), res


def _check_ray_cluster_spec(spec: dict) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["rayStartParams"]["num-cpus"] == "0" and "dashboard-host" in head["rayStartParams"]
    for group, container in _ray_groups(spec):
        assert container["image"] == _k8s_image()
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), group.get("groupName", "head")
        assert _env(container)["MLFLOW_TRACKING_URI"] == _mlflow_service_url()
        assert isinstance(group["rayStartParams"], dict)
    gpu = [g for g in spec["workerGroupSpecs"] if g["template"]["spec"]["containers"][0]["resources"]["limits"]
           .get("nvidia.com/gpu")]
    assert gpu, "a GPU worker group"
    g = gpu[0]
    assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1
    tolerations = g["template"]["spec"].get("tolerations", [])
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)


def _mlflow_service_url() -> str:
    svc = next(d for d in _docs("mlflow.yaml") if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    return f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{svc['spec']['ports'][0]['port']}"


def test_raycluster_head_and_gpu_workers():
    (rc,) = _docs("raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    _check_ray_cluster_spec(rc["spec"])


def test_rayjob_runs_a_sweep_on_the_same_cluster_spec():
    (job,) = _docs("rayjob-sweep.yaml")
    (rc,) = _docs("raycluster.yaml")
    spec = job["spec"]
    assert job["kind"] == "RayJob" and spec["entrypoint"].startswith("linrep sweep ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"] == rc["spec"], "rayjob-sweep.yaml's rayClusterSpec drifted from raycluster.yaml"
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    specs = REPO / "tune" / "specs"
    if specs.is_dir():  # the sweep spec it names must exist
        name = spec["entrypoint"].split()[2]
        assert (specs / f"{name}.yaml").is_file(), f"tune/specs/{name}.yaml"


def test_mlflow_deployment_postgres_and_object_store():
    docs = _docs("mlflow.yaml")
    deploy = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow")
    server = deploy["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(server["command"] + server["args"])
    assert "mlflow server" in args and "--backend-store-uri=postgresql" in args and "--artifacts-destination=s3://" in args
    assert "MLFLOW_S3_ENDPOINT_URL" in _env(server)
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "mlflow-postgres"), ("Service", "mlflow-postgres"), ("Service", "mlflow-minio"),
            ("Service", "mlflow")} <= names
    # the Service selects the Deployment's pods
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow")
    assert svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    # the NetworkPolicy covers every tracking pod (server, database, object store)
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    sel = policy["spec"]["podSelector"]["matchLabels"]
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            assert sel.items() <= d["spec"]["template"]["metadata"]["labels"].items(), d["metadata"]["name"]


def test_nothing_is_exposed_outside_the_cluster_and_no_secret_is_inline():
    secret_words = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", re.I)
    for d in _all_docs():
        assert d["kind"] != "Ingress"
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
        for pod in _pod_specs(d):
            assert not pod.get("hostNetwork")
            for c in _containers(pod):
                assert not any("hostPort" in p for p in c.get("ports", [])), c["name"]
                for e in c.get("env", []):
                    if secret_words.search(e["name"]):
                        assert "secretKeyRef" in e.get("valueFrom", {}), f"{c['name']}: {e['name']} must come from a Secret"
    assert not any(d["kind"] == "Secret" for d in _all_docs())


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [spec["template"]["spec"]]
    cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec")
    if cluster:
        return [g["template"]["spec"] for g, _ in _ray_groups(cluster)]
    return []


# ---- Dockerfile vs the project's install ---------------------------------------------------
def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _makefile_torch_spec() -> str:
    m = re.search(r"^TORCH_SPEC\s*\?=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert m, "Makefile sets TORCH_SPEC ?= ..."
    return m.group(1).strip()


def test_dockerfile_mirrors_the_makefile_install():
    steps = _instructions(DOCKERFILE.read_text())
    args = dict(re.match(r'(\w+)=?"?([^"]*)"?', a).groups() for k, a in steps if k == "ARG" and "=" in a)
    assert args["TORCH_SPEC"] == _makefile_torch_spec()
    base = next(a for k, a in steps if k == "FROM").replace("${CUDA_IMAGE}", args.get("CUDA_IMAGE", ""))
    assert base.startswith("nvidia/cuda:"), base
    runs = [a for k, a in steps if k == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \$\{?TORCH_SPEC\}?", r))
    project_at = [i for i, r in enumerate(runs) if re.search(r"pip install( --no-deps)? (-e )?\.( |$)", r)]
    assert project_at and torch_at < project_at[0], "torch first, then the project (as the Makefile)"
    make = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*\$\(TORCH_SPEC\)", make) and re.search(r"pip install .*-e '?\.", make)
    # every package the project ships is copied in before the final install
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {a.split()[0] for k, a in steps if k == "COPY"}
    for pattern in include:
        assert pattern.rstrip("*") in copied, f"COPY {pattern.rstrip('*')}"
    assert "pyproject.toml" in copied


@pytest.mark.parametrize("need_gb, ok", [(0, True), (10**6, False)])
def test_a_fresh_install_without_room_for_the_venv_stops_in_one_line(tmp_path, need_gb, ok):
    """`make` checks the disk before it creates .venv (scripts/disk-room.sh): torch's CUDA wheels
    fill ~7 GB, and a disk that fills half-way through pip leaves a broken venv."""
    venv = tmp_path / "not" / "yet" / ".venv"  # the folders above it do not exist either
    out = subprocess.run(["bash", str(REPO / "scripts" / "disk-room.sh"), str(venv), str(need_gb)],
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode == 0) is ok and out.stdout == ""
    if not ok:
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and f"not enough disk for {venv}" in lines[0] and f"~{need_gb} GB" in lines[0], lines
    make = (REPO / "Makefile").read_text()
    assert make.index("disk-room.sh $(VENV)") < make.index("-m venv $(VENV)")


def test_dockerignore_keeps_the_context_to_the_project():
    ignored = {l.strip().strip("/") for l in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    assert {".git", ".venv", "data", "mlruns", "ray_results", "results", ".linrep-cluster"} <= ignored


def test_pip_install_dot_ships_the_presets(tmp_path):
    """What the image's `pip install .` gets: a wheel with every preset and sweep spec (the
    cluster runs `linrep train <preset>`)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    for pkg in ("linrep", "trainer", "probes", "tune"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "README.md").write_text("linrep\n")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = [p.relative_to(REPO).as_posix() for d in ("trainer/presets", "tune/specs") if (REPO / d).is_dir()
              for p in (REPO / d).glob("*.yaml")]
    assert wanted and not [w for w in wanted if w not in names], \
        f"missing from the wheel: {[w for w in wanted if w not in names]} (pyproject [tool.setuptools.package-data])"


# ---- infra/local/cluster.sh for real -------------------------------------------------------
def _all_loopback(pids: list[int]) -> list[tuple]:
    return [row for row in listeners(pids) if row[0] not in LOOPBACK]


def test_cluster_sh_up_is_local_only_idempotent_and_down_leaves_nothing(tmp_path):
    c = LocalCluster.on_free_ports(tmp_path / "state")
    up = c.run("up", timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        pids = c.pids()
        assert set(pids) == {"ray", "mlflow"}
        tree = {p.pid for pid in pids.values() for p in process_tree(pid)}
        # the machine's socket table, for every process we started
        rows = listeners(list(pids.values()))
        ports = {port for _, port, _, _ in rows}
        assert {c.ray_port, c.dashboard_port, c.mlflow_port} <= ports, rows
        assert not _all_loopback(list(pids.values())), rows
        assert (c.state_dir / "auth_token").stat().st_mode & 0o077 == 0  # the token is private
        env = (c.state_dir / "env").read_text()
        assert f"RAY_API_SERVER_ADDRESS=http://127.0.0.1:{c.dashboard_port}" in env
        assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{c.mlflow_port}" in env

        again = c.run("up", timeout=120)
        assert again.returncode == 0 and "already up" in again.stdout, again.stdout + again.stderr
        assert c.pids() == pids
        status = c.run("status", timeout=60)
        assert status.returncode == 0 and "Ray head: running" in status.stdout
        ray_tmp = Path((c.state_dir / "ray.tmpdir").read_text().strip())
        assert ray_tmp.is_dir()
    finally:
        down = c.run("down", timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not ray_tmp.exists()
    for leftover in ("ray.pid", "mlflow.pid", "auth_token", "env", "cluster.json", "ray.tmpdir"):
        assert not (c.state_dir / leftover).exists(), leftover
    assert (c.state_dir / "mlflow.db").exists()  # the runs are kept
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert not listening & {c.ray_port, c.dashboard_port, c.mlflow_port}  # the ports are free again
    assert c.run("status", timeout=60).returncode == 3
    assert c.run("down", timeout=60).returncode == 0  # idempotent too
    purge = c.run("down", "--purge", timeout=60)
    assert purge.returncode == 0 and not (c.state_dir / "mlflow.db").exists()


def test_cluster_sh_up_with_a_busy_port_fails_in_one_line_and_starts_nothing(tmp_path):
    c = LocalCluster.on_free_ports(tmp_path / "state")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", c.mlflow_port))
        busy.listen()
        out = c.run("up", timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip() == (f"cluster.sh: port {c.mlflow_port} on 127.0.0.1 is already in use: "
                                  "free it or set LINREP_MLFLOW_PORT")
    assert c.pids() == {}


def test_cluster_sh_usage():
    out = subprocess.run(["bash", str(INFRA / "local" / "cluster.sh"), "sideways"], capture_output=True, text=True)
    assert out.returncode == 2 and "usage:" in out.stderr


# ---- security of the shipped manifests (issue 17, second pass) -------------------------------
SECRET_KEY_WORDS = re.compile(r"password|secret|token", re.I)
URI_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")


def _every_pod(doc: dict) -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod a manifest starts: Deployments, StatefulSets, Jobs, Ray groups."""
    spec = doc.get("spec", {})
    if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
        return [(doc["metadata"]["name"], spec["template"]["spec"])]
    cluster = spec if doc["kind"] == "RayCluster" else spec.get("rayClusterSpec") if doc["kind"] == "RayJob" else None
    if cluster:
        return [(f"{doc['metadata']['name']}/{g.get('groupName', 'head')}", g["template"]["spec"])
                for g, _ in _ray_groups(cluster)]
    return []


def _every_container() -> list[tuple[str, dict, dict]]:
    """(pod name, pod template labels, container) for every container and init container."""
    out = []
    for doc in _all_docs():
        for name, pod in _every_pod(doc):
            for c in _containers(pod):
                out.append((name, doc, c))
    return out


def _argv(container: dict) -> str:
    return " ".join(str(x) for x in container.get("command", []) + container.get("args", []))


def _secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    """env name -> (Secret, key) for the container's env drawn from Secrets."""
    refs = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs[e["name"]] = (ref["name"], ref["key"])
    return refs


def _launcher_commands() -> list[str]:
    cfg = yaml.safe_load(LAUNCHER.read_text())
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands",
                          "head_setup_commands", "worker_setup_commands", "initialization_commands")
            for c in cfg.get(key) or []]


def test_nothing_listens_on_all_interfaces_without_auth():
    mlflow_servers = 0
    for name, doc, c in _every_container():
        argv = _argv(c)
        if "mlflow server" in argv or c.get("command", [None])[0] == "mlflow":
            mlflow_servers += 1
            assert re.search(r"--app-name[= ]basic-auth", argv), f"{name}: MLflow server without auth"
        elif "0.0.0.0" in argv:
            pytest.fail(f"{name}/{c['name']}: listens on 0.0.0.0 without auth: {argv[:200]}")
    for doc in _all_docs():  # Ray's dashboard on the pod's interfaces: only behind Ray token auth
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec") \
            if doc["kind"] == "RayJob" else None
        if cluster and cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "0.0.0.0":
            assert cluster["authOptions"]["mode"] == "token", doc["metadata"]["name"]
    assert mlflow_servers == 1
    launched = [c for c in _launcher_commands() if "mlflow server" in c]
    assert launched, "the launcher starts MLflow on the head"
    for command in _launcher_commands():
        if "mlflow server" in command and "0.0.0.0" in command:
            assert "--app-name basic-auth" in command and "MLFLOW_AUTH_ADMIN_PASSWORD=\"$" in command, command
        assert "--dashboard-host=0.0.0.0" not in command and "--host 0.0.0.0 " not in command.replace(
            "--app-name basic-auth --host 0.0.0.0 ", ""), command
    cfg = yaml.safe_load(LAUNCHER.read_text())  # the login reaches the nodes as a file, not in the YAML
    assert any("mlflow-auth.env" in k for k in cfg["file_mounts"])
    assert not URI_WITH_PASSWORD.search(LAUNCHER.read_text())


def test_no_password_reaches_a_command_line():
    checked = 0
    for name, doc, c in _every_container():
        argv = _argv(c)
        secret_envs = {env for env, (_, key) in _secret_refs(c).items() if SECRET_KEY_WORDS.search(key)}
        for env in secret_envs:  # Kubernetes expands $(VAR) into the process's argv
            assert f"$({env})" not in argv, f"{name}/{c['name']}: the secret {env} is expanded into argv"
            checked += 1
        assert not URI_WITH_PASSWORD.search(argv), f"{name}/{c['name']}: a URI with a password in argv"
        for e in c.get("env", []):  # a literal password in a plain env value
            if SECRET_KEY_WORDS.search(e["name"]) and "value" in e:
                pytest.fail(f"{name}/{c['name']}: {e['name']} has a literal value")
    assert checked >= 5
    server = next(c for _, d, c in _every_container() if d["metadata"]["name"] == "mlflow" and c["name"] == "mlflow")
    uri = next(a for a in server["args"] if a.startswith("--backend-store-uri="))
    assert "DB_PASSWORD" not in uri and _env(server)["PGPASSFILE"], "the database password comes from a pgpass file"
    assert "DB_PASSWORD" not in _env(server)  # the server's process never holds it in its env either


def test_network_policies_confine_ray_ports_and_the_tracking_pods():
    policies = [d for d in _all_docs() if d["kind"] == "NetworkPolicy"]
    ray_label = {"app.kubernetes.io/part-of": "linrep"}
    tracking_label = {"app.kubernetes.io/part-of": "linrep-tracking"}

    def policy_for(label: dict) -> dict:
        found = [p for p in policies if p["spec"]["podSelector"].get("matchLabels") == label]
        assert found, f"a NetworkPolicy selects {label}"
        return found[0]

    for label, allowed in ((ray_label, [ray_label]), (tracking_label, [ray_label, tracking_label])):
        policy = policy_for(label)
        assert "Ingress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), "a rule without `from` admits every pod and address"
            for peer in rule["from"]:
                assert "ipBlock" not in peer
                if "namespaceSelector" in peer:  # only the KubeRay operator's namespace, only Ray's API ports
                    assert peer["namespaceSelector"]["matchLabels"], peer
                    assert {p["port"] for p in rule["ports"]} <= {8265, 6379}
                else:
                    sel = peer["podSelector"]["matchLabels"]
                    assert sel in allowed or sel == {"app.kubernetes.io/created-by": "kuberay-operator"}, sel
    for name, doc, _ in _every_container():  # every pod is covered by one of the two policies
        labels = (doc["spec"]["template"]["metadata"]["labels"] if doc["kind"] in ("Deployment", "StatefulSet", "Job")
                  else None)
        if labels is not None:
            assert labels.get("app.kubernetes.io/part-of") in ("linrep", "linrep-tracking"), name
    for doc in _all_docs():
        cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec") \
            if doc["kind"] == "RayJob" else None
        for group, _ in _ray_groups(cluster) if cluster else []:
            assert ray_label.items() <= group["template"]["metadata"]["labels"].items()


def test_the_object_store_root_login_stays_with_minio():
    root_users = set()
    for name, doc, c in _every_container():
        refs = _secret_refs(c)
        uses_root = any(secret == "minio-root" for secret, _ in refs.values())
        if uses_root:
            root_users.add(doc["metadata"]["name"])
        if c["name"] == "mlflow":  # the server: the dedicated user, never the root login
            assert refs["AWS_ACCESS_KEY_ID"][0] == refs["AWS_SECRET_ACCESS_KEY"][0] == "mlflow-s3"
        assert not any(env.startswith("MINIO_ROOT") for env in refs) or uses_root
    assert root_users == {"mlflow-minio", "minio-setup"}, root_users
    minio = next(c for _, d, c in _every_container() if d["metadata"]["name"] == "mlflow-minio")
    assert {s for s, _ in _secret_refs(minio).values()} == {"minio-root"}
    job = next(c for _, d, c in _every_container() if d["metadata"]["name"] == "minio-setup")
    script = _argv(job)
    policy = json.loads(script[script.index("{"):script.rindex("}") + 1])
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::mlflow-artifacts", "arn:aws:s3:::mlflow-artifacts/*"}
    assert not any("admin:" in a or a == "s3:*" for s in policy["Statement"] for a in s["Action"])
    assert "mc admin policy attach root mlflow-artifacts-rw --user \"$S3_ACCESS_KEY\"" in script
