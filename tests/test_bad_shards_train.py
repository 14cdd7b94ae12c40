"""Bad shards through `linrep train`: what a user sees when the real CLI meets them.

tests/test_stream.py and tests/test_shards.py test the loader and the manifest reader alone; here
each case runs `linrep train dislib-dsprites-mlp` as a subprocess on a tiny fabricated dSprites
shard folder (60 images: train 30 + 18, val 6, test 6) damaged one way, and must end with exit 2
(trainer/errors.py UserError), exactly one line on stderr naming the shard (or split) and what is
wrong, nothing on stdout, no traceback, the shard folder byte-for-byte as it was, and no MLflow
run left RUNNING. The checks are the driver's preflight (trainer/run.py `preflight`,
trainer/data/integrity.py), so every refusal comes before Ray starts and before a run opens
(about 2.5 s each, measured on the 2-core VM).

Two cases need Ray (the session's shared one): a shard changed after a real run verified it, and
a split whose every image is undecodable, which only the loader can see (exit 1: a fault met while
running, not a loop).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

EXIT_BAD_INPUT = 2
REFUSAL_TIMEOUT_S = 240  # a refusal ends in the preflight (~2.5 s here): a generous bound on a busy VM
RUN_TIMEOUT_S = 600
TINY = ["optim.steps=2", "run.workers=1", "probe.enabled=false", "optim.batch_size=8", "run.checkpoint_every=2",
        "run.log_every=1", "data.shuffle_buffer=8", "data.loader_workers=0", "model.hidden=[16]",
        "optim.warmup_steps=0", "run.stop_at={}", "run.max_failures=0", "run.name=bad-shards",
        "optim.engine=ddp", "optim.zero_stage=0"]


# ---- a tiny shard folder, and ways to damage it ---------------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """One good shard folder per module (copied per case): 60 dSprites images, 30 per shard."""
    from trainer.data.convert.dsprites import generate_dsprites

    root = tmp_path_factory.mktemp("bad-shards-template") / "ds"
    generate_dsprites(root, limit=60, samples_per_shard=30, processes=1, progress=False)
    return root


@pytest.fixture
def shards(tmp_path, template) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(template, root)
    return root


def read_samples(path: Path) -> list[dict]:
    from trainer.data.tario import group_samples, tar_members

    with open(path, "rb") as fh:
        return [{k: v for k, v in s.items() if k != "__url__"} for s in group_samples(tar_members(fh), str(path))]


def rewrite_shard(root: Path, name: str, edit, every: bool = False) -> str:
    """Rewrite shard `name` with `edit(sample)` applied to its first sample (or every one) (a valid
    tar, the manifest's sha256 and count updated: only the samples are wrong); returns the first key."""
    from trainer.data.convert.shards import write_shard

    samples = read_samples(root / name)
    for sample in samples if every else samples[:1]:
        edit(sample)
    info = write_shard(root / name, samples)
    manifest = json.loads((root / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if shard["name"] == name:
                shard.update(sha256=info.sha256, num_samples=info.num_samples)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return samples[0]["__key__"]


def npy(values) -> bytes:
    from trainer.data.convert.shards import encode_npy

    return encode_npy(np.asarray(values, dtype=np.float32))


def flip_byte(path: Path, at: int = 5000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- the promise ------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root: size, mtime and content hash ('untouched' compares two)."""
    import hashlib

    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def running_runs(cwd: Path) -> list[str]:
    """Ids of MLflow runs left RUNNING in the store `linrep train` uses under cwd (none if no store)."""
    db = cwd / "mlruns" / "mlflow.db"
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(ids, filter_string="attributes.status = 'RUNNING'")]


def clean_env(extra: dict | None = None) -> dict[str, str]:
    """The session's environment minus stores and Ray addresses (each case uses its own cwd)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_", "LINREP_"))}
    env.update(extra or {})
    return env


def train(root: Path, cwd: Path, *overrides: str, env: dict | None = None, timeout: float = REFUSAL_TIMEOUT_S):
    cwd.mkdir(exist_ok=True)
    started = time.monotonic()
    proc = run_cli(["train", "dislib-dsprites-mlp", f"data.root={root}", *TINY, *overrides], cwd=cwd,
                   env=clean_env(env), timeout=timeout)
    return proc, time.monotonic() - started


def assert_refused(root: Path, cwd: Path, *needles: str, overrides: tuple = (), env: dict | None = None) -> str:
    """Run `linrep train` on root and check the promise; returns the stderr line."""
    before, had_run_folder = snapshot(root), (cwd / "ray_results").exists()
    proc, elapsed = train(root, cwd, *overrides, env=env)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    shown = (f"exit {proc.returncode} after {elapsed:.1f} s\nstderr: {proc.stderr[-3000:]}\n"
             f"stdout: {proc.stdout[-1000:]}")
    assert proc.returncode == EXIT_BAD_INPUT, shown
    assert len(lines) == 1 and lines[0].startswith("linrep: error: "), shown
    assert all(n in lines[0] for n in needles), f"expected {needles} in the line\n{shown}"
    assert "Traceback" not in proc.stderr and not proc.stdout.strip(), shown
    assert snapshot(root) == before, "the shard folder changed"
    assert running_runs(cwd) == []
    assert had_run_folder or not (cwd / "ray_results").exists(), "refused after a run folder was made"
    print(f"\n[{elapsed:.1f} s] {lines[0]}")
    return lines[0]


# ---- the cases ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["factors.npy", "cls"])
def test_a_sample_missing_a_field(shards, tmp_path, field):
    key = rewrite_shard(shards, "train-000001.tar", lambda s: s.pop(field))
    assert_refused(shards, tmp_path / "cwd", "train-000001.tar", f"sample {key}: has no {field}")


def test_factors_of_the_wrong_length(shards, tmp_path):
    key = rewrite_shard(shards, "train-000000.tar", lambda s: s.update({"factors.npy": npy([1.0, 2.0, 0.5])}))
    assert_refused(shards, tmp_path / "cwd", "train-000000.tar", f"sample {key}",
                   "factors.npy holds 3 values, manifest.json lists 6 factors")


def test_a_class_index_out_of_range(shards, tmp_path):
    key = rewrite_shard(shards, "train-000001.tar", lambda s: s.update(cls=b"7"))
    assert_refused(shards, tmp_path / "cwd", "train-000001.tar", f"sample {key}", "cls 7 is outside 0..2")


def test_a_factor_value_off_its_grid(shards, tmp_path):
    """labels=factor maps a categorical value to the nearest grid value: a shape of 7 would silently
    train as class 2. It is refused instead."""
    def shape_seven(sample):
        values = np.load(io.BytesIO(sample["factors.npy"]))
        values[1] = 7.0
        sample["factors.npy"] = npy(values)

    key = rewrite_shard(shards, "train-000000.tar", shape_seven)
    assert_refused(shards, tmp_path / "cwd", "train-000000.tar", f"sample {key}", "factor shape=7 is not one of")


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_split(shards, tmp_path, split):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"][split] = {"num_samples": 0, "shards": []}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    probes = "probe.enabled=true" if split == "val" else "probe.enabled=false"  # val is read by the probes
    assert_refused(shards, tmp_path / "cwd", f"split '{split}' has no samples", str(shards), overrides=(probes,))


def test_every_shard_corrupt_with_skip_stops_in_one_line(shards, tmp_path):
    for shard in sorted(shards.glob("train-*.tar")):
        flip_byte(shard)
    assert_refused(shards, tmp_path / "cwd", "data.on_error=skip", "every shard of split 'train' is corrupt",
                   "train-000000.tar", overrides=("data.on_error=skip",))


def test_a_shard_changed_after_verification_keeping_size_and_mtime_is_refused(shards, tmp_path, shared_ray):
    """A real run verifies the shards (and caches the pass in .verified.json); a shard's bytes then
    change with its size and mtime restored (os.utime). The cache is keyed by size, mtime, ctime and
    inode: the ctime moved, so the rerun's preflight hashes the shard again and refuses it."""
    cwd = tmp_path / "cwd"
    first, elapsed = train(shards, cwd, env=shared_ray, timeout=RUN_TIMEOUT_S)
    assert first.returncode == 0, f"{elapsed:.0f} s\n{first.stderr[-4000:]}"
    print(f"\n[{elapsed:.1f} s] the first run finished")
    cache = json.loads((shards / ".verified.json").read_text())
    assert sorted(cache) == ["train-000000.tar", "train-000001.tar"]
    shard = shards / "train-000001.tar"
    st = shard.stat()
    flip_byte(shard, at=st.st_size // 2)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert_refused(shards, cwd, "train-000001.tar", "sha256 does not match manifest.json", env=shared_ray)


def test_every_image_undecodable_with_skip_stops_instead_of_reading_forever(shards, tmp_path, shared_ray):
    """Not a preflight case: images are decoded only by the loader (decoding all of ImageNet at start
    would take hours). Every PNG of the split is garbage and data.on_error=skip: the Ray Train worker's
    loader skips sample after sample; past two passes' worth in a row it stops, and the run ends as a
    fault met while running (exit 1), in one line naming a shard and a sample, its MLflow run FAILED."""
    for shard in ("train-000000.tar", "train-000001.tar"):
        rewrite_shard(shards, shard, lambda s: s.update(png=b"not a png at all" * 4), every=True)
    cwd = tmp_path / "cwd"
    before = snapshot(shards)
    proc, elapsed = train(shards, cwd, "data.on_error=skip", env=shared_ray, timeout=RUN_TIMEOUT_S)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    shown = f"exit {proc.returncode} after {elapsed:.1f} s\nstderr: {proc.stderr[-3000:]}"
    assert proc.returncode == 1, shown
    assert len(lines) == 1 and "no decodable sample in" in lines[0] and "train-00000" in lines[0], shown
    assert "Traceback" not in proc.stderr, shown
    assert snapshot(shards) == {**before, ".verified.json": snapshot(shards)[".verified.json"]}
    assert running_runs(cwd) == []
    print(f"\n[{elapsed:.1f} s] {lines[0]}")
