"""Storage as a URI (trainer.storage): local folders and a real S3-compatible server (moto in
server mode, a subprocess on 127.0.0.1) behind one interface; a training run, its resume, its
retention, its probe actor and `linrep probe RUN_ID` with run.storage=s3://...; shards read from
s3:// yield what the local folder yields."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import pytest

from trainer.errors import UserError
from trainer.storage import S3_REQUEST_TIMEOUT_S, Location, locate

FAKE_ENV = {"AWS_ACCESS_KEY_ID": "linrep-test-key", "AWS_SECRET_ACCESS_KEY": "linrep-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOTO: dict = {}  # the module's moto server process (s3_server), for the tests that pause it


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free local port; the AWS variables point this process (and every
    subprocess it starts) at it for the module's duration. Yields the endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    MOTO["proc"] = proc
    saved = {k: os.environ.get(k) for k in [*FAKE_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update({**FAKE_ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.2)
        yield endpoint
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket per test (its name as s3://NAME)."""
    import boto3

    name = f"linrep-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


# ---- parsing -------------------------------------------------------------------------------
def test_local_paths_and_file_uris_resolve_to_absolute_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = locate("./ray_results")
    assert rel.is_local and str(rel) == str(tmp_path.resolve() / "ray_results")
    assert locate(f"file://{tmp_path}/x") == locate(tmp_path / "x")
    assert str(locate("~/r")) == os.path.expanduser("~/r")


def test_s3_uris_parse_without_touching_the_network(s3_server):
    loc = locate("s3://bucket/a//b/")
    assert (loc.scheme, loc.path, str(loc)) == ("s3", "bucket/a/b", "s3://bucket/a/b")
    assert str(loc / "checkpoint_00000100") == "s3://bucket/a/b/checkpoint_00000100"
    assert str(loc.parent) == "s3://bucket/a"


def test_unknown_schemes_and_bucketless_uris_fail_in_one_line():
    with pytest.raises(UserError, match=r"cannot be opened .*use a local path, file://, s3://"):
        locate("nosuch://bucket/x")
    with pytest.raises(UserError, match="s3://BUCKET/PATH"):
        locate("s3://")


@pytest.mark.parametrize("name", ["../escape", "..", "a/../../b"])
def test_run_names_that_climb_out_are_refused_on_local_and_s3(tmp_path, s3_server, name):
    from trainer.run import contained_run_dir

    for storage in (str(tmp_path / "ray_results"), "s3://bucket/ray_results"):
        with pytest.raises(UserError, match="outside run.storage"):
            contained_run_dir(storage, name)
    assert str(contained_run_dir("s3://bucket/ray_results", "ok-run")) == "s3://bucket/ray_results/ok-run"


# ---- round trips ---------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return locate(tmp_path / "store")
    return locate(request.getfixturevalue("bucket")) / "store"


def test_write_read_list_delete_round_trip(root, tmp_path):
    (root / "a" / "meta.json").write_json({"step": 3})
    (root / "a" / "sub" / "w.bin").write_bytes(b"\x00" * 10)
    (root / "b").mkdir()
    (root / "b" / "x.txt").write_text("hi")
    assert (root / "a" / "meta.json").exists() and (root / "a").is_dir() and not (root / "nope").exists()
    assert (root / "a" / "sub" / "w.bin").read_bytes() == b"\x00" * 10
    assert sorted(d.name for d in root.subdirs()) == ["a", "b"]
    assert (root / "a").files() == {"meta.json": len((root / "a" / "meta.json").read_bytes()), "sub/w.bin": 10}
    with pytest.raises(FileNotFoundError):
        (root / "missing.json").read_text()
    local = (root / "a").download(tmp_path / "dl")
    assert (local / "sub" / "w.bin").read_bytes() == b"\x00" * 10
    (root / "c").upload(local)
    assert (root / "c").files() == (root / "a").files()
    (root / "a").delete_dir()
    assert not (root / "a").exists() and sorted(d.name for d in root.subdirs()) == ["b", "c"]
    (root / "b" / "x.txt").unlink()
    (root / "b" / "x.txt").unlink()  # missing_ok
    assert not (root / "b" / "x.txt").exists()


def test_checkpoint_listing_completeness_and_retention_on_s3(bucket, tmp_path):
    """The same checkpoint rules on a bucket: meta.json lists every file's size; a short copy is
    not complete; retention empties all but the last and the best, leaving a PRUNED marker."""
    import json

    from trainer.checkpoint import PRUNED_MARKER, is_complete, list_checkpoints, prune_checkpoints

    run = locate(bucket) / "ray_results" / "r"
    for step in (100, 200, 300, 400):
        d = run / f"checkpoint_{step:08d}"
        (d / "model.pt").write_bytes(b"w" * step)
        (d / "config.yaml").write_text("x: 1\n")
        (d / "meta.json").write_text(json.dumps({"step": step, "files": {"model.pt": step, "config.yaml": 5}}))
    (run / "checkpoint_00000400" / "model.pt").write_bytes(b"short")  # a cut-off upload
    assert not is_complete(run / "checkpoint_00000400")
    assert [c.name for c in list_checkpoints(run)] == ["checkpoint_00000100", "checkpoint_00000200",
                                                      "checkpoint_00000300"]
    assert prune_checkpoints(run, keep_last=1, best_step=100) == [200]
    assert [c.name for c in list_checkpoints(str(run))] == ["checkpoint_00000100", "checkpoint_00000300"]
    assert (run / "checkpoint_00000200").files() == {PRUNED_MARKER: len((run / "checkpoint_00000200" /
                                                                        PRUNED_MARKER).read_bytes())}


# ---- a training run on s3:// ---------------------------------------------------------------
TINY = ["train", "synthetic-supervised", "run.workers=1", "run.checkpoint_every=50", "run.log_every=50",
        "run.keep_checkpoints=1", "probe.samples=512", "data.generator_pool=1000", "model.hidden=[32,32]",
        "optim.warmup_steps=5", "run.name=s3run"]


def test_train_resume_retention_and_probe_through_a_bucket(bucket, tmp_path):
    """run.storage=s3://...: checkpoints land complete in the bucket, the probes read them from
    there (figures in MLflow), retention prunes in the bucket, a rerun resumes from the bucket's
    latest checkpoint, and `linrep probe RUN_ID` probes from the bucket. The first run trains in the
    command's process (run.in_process, its default here), the rerun through Ray Train and a probe
    actor: both write the bucket, and either resumes what the other wrote."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_linrep
    from trainer.checkpoint import PRUNED_MARKER, list_checkpoints, read_meta

    storage = f"{bucket}/ray_results"
    out = run_linrep([*TINY, "optim.steps=100", f"run.storage={storage}"], cwd=tmp_path, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "training in this process" in log
    assert not (tmp_path / "s3:").exists() and "linrep-test-secret" not in log
    run_dir = locate(storage) / "s3run"
    assert f"checkpoints: {run_dir}" in log

    out = run_linrep([*TINY, "optim.steps=150", f"run.storage={storage}", "run.in_process=false"], cwd=tmp_path,
                     timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "resumed from step 100" in log and "training in this process" not in log

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
    probed = sorted(m.step for m in client.get_metric_history(run.info.run_id, "probe/r2_affine"))
    assert probed == [50, 100, 150]
    assert run.data.tags["linrep.run_dir"] == str(run_dir)
    assert "linrep-test-secret" not in str(run.data.params) + str(run.data.tags)
    # retention in the bucket: the last checkpoint and the best by r2_affine stay, the rest hold PRUNED
    kept = [read_meta(c)["step"] for c in list_checkpoints(run_dir)]
    assert 150 in kept and 1 <= len(kept) <= 2
    pruned = [d for d in run_dir.subdirs("checkpoint_") if (d / PRUNED_MARKER).exists()]
    assert len(pruned) == 3 - len(kept)

    out = run_linrep(["probe", "--no-log", run.info.run_id], cwd=tmp_path, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "step 150: r2_affine=" in out.stdout


# ---- shards read from s3:// ------------------------------------------------------------------
def test_shards_from_a_bucket_stream_the_same_samples_and_are_verified(bucket, tmp_path):
    """data.root=s3://...: the manifest and shards are read through trainer.storage (streamed, no
    local copy), sha256 verification still catches a replaced shard, and the training and
    evaluation loaders yield exactly what the local folder yields."""
    from trainer.config import DataConfig
    from trainer.data.convert import dsprites as ds
    from trainer.data.integrity import verified
    from trainer.data.shards import load_manifest, verify_shards
    from trainer.data.stream import make_eval_loader, make_train_loader
    from trainer.errors import RuntimeFault

    local_root = tmp_path / "sprites"
    ds.generate_dsprites(local_root, seed=0, samples_per_shard=20, processes=1, limit=120, progress=False)
    remote_root = locate(bucket) / "dsprites"
    remote_root.upload(local_root)

    local, remote = load_manifest(local_root), load_manifest(str(remote_root))
    assert remote.root == remote_root and remote.splits == local.splits
    verify_shards(remote.root, remote)
    assert verified(remote, "train")[1] == 0

    def batches(manifest, make, **kw):
        cfg = DataConfig(dataset="dsprites", root=str(manifest.root), shuffle_buffer=30, loader_workers=0)
        return [(b["key"], b["image"], b["factors"]) for b in make(cfg, manifest, batch_size=8, **kw)]

    train = dict(rank=0, world_size=1, seed=0, epoch=0, num_batches=4)
    for (lk, li, lf), (rk, ri, rf) in zip(batches(local, make_train_loader, **train),
                                          batches(remote, make_train_loader, **train), strict=True):
        assert lk == rk and (li == ri).all() and (lf == rf).all()
    assert [k for k, _, _ in batches(local, make_eval_loader, split="val")] == \
        [k for k, _, _ in batches(remote, make_eval_loader, split="val")]

    first = remote.shards("train")[0].name
    damaged = bytearray((local_root / first).read_bytes())
    damaged[700] ^= 0xFF  # inside the first member's data: same size, other sha256
    (remote_root / first).write_bytes(bytes(damaged))
    (remote_root / ".verified.json").unlink()
    with pytest.raises(RuntimeFault, match=f"shard s3://.*/{first}: sha256 does not match"):
        verified(load_manifest(str(remote_root)), "train")


# ---- sweeps: where their folder lives ------------------------------------------------------
def _entrypoint_plan(entrypoint: str, storage: str | None = None):
    import shlex

    from tune.spec import build_plan, load_spec

    argv = shlex.split(entrypoint)
    assert argv[:2] == ["linrep", "sweep"]
    spec, text, path = load_spec(argv[2])
    return build_plan(spec, spec_text=text, where=str(path), cli_overrides=argv[3:], storage=storage)


def test_the_shipped_rayjob_sweep_command_plans_under_its_run_storage(tmp_path):
    """infra/k8s/rayjob-sweep.yaml passes run.storage=...: it sets the sweep's root."""
    import yaml

    from tests.conftest import REPO
    from tune.spec import trial_config

    job = yaml.safe_load((REPO / "infra" / "k8s" / "rayjob-sweep.yaml").read_text())
    plan = _entrypoint_plan(job["spec"]["entrypoint"])
    assert str(plan.sweep_dir) == f"/mnt/shared/ray_results/sweeps/{plan.name}"
    assert all("run.storage" not in t.overrides for t in plan.trials)
    trial = plan.trials[0]
    assert trial_config(trial, plan.sweep_dir / "runs").run.storage == f"{plan.sweep_dir}/runs"


def test_sweep_root_from_storage_flag_override_and_env(s3_server, monkeypatch, tmp_path):
    from tune.spec import SweepPlan, sweep_root

    assert sweep_root("s3://b/sweeps", "/x", None, "./ray_results") == "s3://b/sweeps"
    assert sweep_root(None, "s3://b/ray_results", "/spec", "./ray_results") == "s3://b/ray_results/sweeps"
    assert sweep_root(None, None, None, "s3://b/r") == "s3://b/r/sweeps"
    monkeypatch.setenv("LINREP_STORAGE", "s3://b/shared")
    assert sweep_root(None, None, None, "./ray_results") == "s3://b/shared/sweeps"
    assert str(SweepPlan(name="n", trials=[], swept=[], storage="s3://b/shared/sweeps").sweep_dir) == \
        "s3://b/shared/sweeps/n"
    with pytest.raises(UserError, match="cannot be opened"):
        sweep_root("nosuch://x", None, None, "./ray_results")


def test_tiny_sweep_with_its_folder_in_a_bucket(bucket, tmp_path):
    """linrep sweep SPEC --storage s3://...: ledger, plan, state, Tune's state, each trial's
    checkpoints and the summary all land in the bucket; nothing under ./ray_results."""
    import json

    import yaml

    from tests.conftest import run_linrep
    from trainer.checkpoint import list_checkpoints, read_meta
    from tune.folder import PLAN_FILE, STATE_FILE, TrialLedger

    spec = {"name": "s3sweep", "base": "synthetic-supervised", "classes": [10, 20], "seeds": 1, "max_concurrent": 2,
            "overrides": {"optim.steps": 100, "optim.warmup_steps": 5, "run.checkpoint_every": 50,
                          "run.log_every": 50, "model.hidden": [16], "data.generator_pool": 500,
                          "probe.samples": 512}}
    (tmp_path / "s3sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = run_linrep(["sweep", str(tmp_path / "s3sweep.yaml"), "--storage", f"{bucket}/sweeps"], cwd=tmp_path,
                     timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    folder = locate(bucket) / "sweeps" / "s3sweep"
    plan = json.loads((folder / PLAN_FILE).read_text())
    assert json.loads((folder / STATE_FILE).read_text())["trials"] == 2
    for trial in plan["trials"]:
        assert TrialLedger(folder, trial["key"]).status == "finished"
        assert [read_meta(c)["step"] for c in list_checkpoints(folder / "runs" / trial["key"])][-1] == 100
    assert (folder / "summary" / "summary.csv").read_text().count("\n") == 3
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "s3:").exists()


def test_a_missing_bucket_ends_the_command_in_one_line_before_anything_starts(s3_server, tmp_path):
    from tests.conftest import run_linrep

    out = run_linrep(["train", "synthetic-supervised", "run.storage=s3://no-such-bucket/ray_results"],
                     cwd=tmp_path, timeout=300)
    assert out.returncode == 2, (out.stdout + out.stderr)[-2000:]
    (line,) = [l for l in out.stderr.splitlines() if "no-such-bucket" in l]
    assert "bucket s3://no-such-bucket does not exist" in line


# ---- a store that stops answering for a while ----------------------------------------------------
@contextmanager
def _store_paused(seconds: float):
    """moto SIGSTOPped (it accepts connections and answers nothing, like a hung store); a timer
    SIGCONTs it after `seconds`, or leaving the block does. Yields {'resumed': monotonic time}."""
    pgid, state, lock = MOTO["proc"].pid, {}, threading.Lock()

    def resume():
        with lock:
            if "resumed" not in state:
                os.killpg(pgid, signal.SIGCONT)
                state["resumed"] = time.monotonic()

    os.killpg(pgid, signal.SIGSTOP)
    timer = threading.Timer(seconds, resume)
    timer.start()
    try:
        yield state
    finally:
        timer.cancel()
        resume()


def test_a_store_paused_for_a_while_is_waited_out_by_the_filesystem_ray_train_gets(bucket):
    """Ray Train writes checkpoints through the filesystem it is handed, pickled: the request
    timeout travels with it, so an upload into a paused store finishes once the store is back
    (pyarrow's default, 3 attempts x 3 s, failed this write 11 s into the pause)."""
    from ray import cloudpickle

    folder = locate(f"{bucket}/runs/r/checkpoint_00000100")
    shipped = cloudpickle.loads(cloudpickle.dumps(folder.ray_storage()["storage_filesystem"]))
    assert shipped.__reduce__()[1][0]["request_timeout"] == S3_REQUEST_TIMEOUT_S
    with _store_paused(15) as state:
        Location(shipped, folder.path + "/model.safetensors", "s3").write_bytes(b"w" * 100_000)
        written = time.monotonic()
    assert written >= state["resumed"]  # it really waited for the store
    assert folder.child("model.safetensors").read_bytes() == b"w" * 100_000


def test_a_store_that_does_not_answer_fails_the_check_in_one_line_within_seconds(bucket):
    """Before a run starts, check_reachable uses a short-timeout client: a hung store ends the
    command in one line after ~8 s, not after the ~3 minutes a running job waits."""
    with _store_paused(120):
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"cannot be reached \(.*\); check the AWS_\* environment") as err:
            locate(f"{bucket}/runs").check_reachable()
        took = time.monotonic() - t0
    assert "\n" not in str(err.value)
    assert took < 60, took  # 2 x 4 s here; the run-time client would still be waiting (3 x 60 s)
