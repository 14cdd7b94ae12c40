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
import time
import uuid

import pytest

from trainer.errors import UserError
from trainer.storage import locate

FAKE_ENV = {"AWS_ACCESS_KEY_ID": "linrep-test-key", "AWS_SECRET_ACCESS_KEY": "linrep-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free local port; the AWS variables point this process (and every
    subprocess it starts) at it for the module's duration. Yields the endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
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
