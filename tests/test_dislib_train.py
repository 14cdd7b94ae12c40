"""DisLib training: DeepSpeed (ZeRO 1 and 2) inside Ray Train on a small dSprites subset, streaming
real WebDataset shards; it checkpoints, resumes, and the probe actor logs the factor figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_linrep
from trainer.checkpoint import list_checkpoints, read_meta


@pytest.fixture(scope="module")
def dsprites_small(tmp_path_factory) -> Path:
    from trainer.data.convert.dsprites import generate_dsprites

    out = tmp_path_factory.mktemp("dsprites_small")
    generate_dsprites(out, seed=0, samples_per_shard=500, processes=2, limit=4000, progress=False)
    return out


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_dsprites_checkpoints_resumes_and_probes(tmp_path, dsprites_small, zero_stage, shared_ray):
    root = str(dsprites_small)
    if zero_stage == 2:  # a relative data.root: Ray workers and the probe actor run in folders of their own
        (tmp_path / "shards").symlink_to(dsprites_small)
        root = "shards"
    common = ["dislib-dsprites-mlp", f"data.root={root}", "run.workers=2", "optim.batch_size=128",
              f"optim.zero_stage={zero_stage}", "run.checkpoint_every=20", "run.log_every=10",
              "probe.max_train_samples=1500", "probe.max_eval_samples=400", "run.name=ds", "optim.warmup_steps=5",
              "data.shuffle_buffer=200", "model.hidden=[128,128,128]", "run.stop_at={}"]
    first = run_linrep(["train", *common, "optim.steps=20"], cwd=tmp_path, env=shared_ray, timeout=900)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    second = run_linrep(["train", *common, "optim.steps=40"], cwd=tmp_path, env=shared_ray, timeout=900)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert "resumed from step 20" in log

    run_dir = tmp_path / "ray_results" / "ds"
    ckpts = list_checkpoints(run_dir)
    assert [read_meta(p)["step"] for p in ckpts] == [20, 40]
    assert all((p / "ds").is_dir() for p in ckpts)  # DeepSpeed's own checkpoint travels with model.pt
    files = {f for f in read_meta(ckpts[-1])["files"]}
    assert any("optim_states" in f for f in files)

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dislib-dsprites").experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert metric_steps(uri, run_id, "train/loss") == [10, 20, 30, 40]
    for key in ("probe/pearson/posX", "probe/pearson/scale", "probe/pearson_pixels/posX", "val/acc"):
        assert metric_steps(uri, run_id, key) == [20, 40], key
    latest = runs[0].data.metrics
    assert 0 <= latest["val/acc"] <= 1 and -1 <= latest["probe/pearson/posX"] <= 1
    arts = [a.path for a in client.list_artifacts(run_id, "probes/step_00000040")]
    assert any(a.endswith("factors.md") for a in arts)


def test_two_workers_read_disjoint_shards(dsprites_small):
    from trainer.config import load_config
    from trainer.data.shards import load_manifest
    from trainer.data.stream import make_train_loader

    cfg = load_config("dislib-dsprites-mlp", [f"data.root={dsprites_small}", "data.loader_workers=0"])
    manifest = load_manifest(dsprites_small)
    keys = []
    for rank in range(2):
        loader = make_train_loader(cfg.data, manifest, rank=rank, world_size=2, batch_size=100, seed=0, epoch=0,
                                   num_batches=15)
        keys.append({k for b in loader for k in b["key"]})
    assert keys[0] and keys[1] and not keys[0] & keys[1]
