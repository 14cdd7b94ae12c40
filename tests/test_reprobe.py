"""`linrep probe RUN_ID` re-probes every checkpoint of a run and logs the figures at their steps:
run twice (or after the training run's own probes), each probe metric holds each checkpoint's
step exactly once in MLflow, and a step the run never probed is filled in."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import run_cli


def write_run(tmp: Path, steps: list[int]) -> Path:
    """A run folder with real checkpoints written by the trainer's write_checkpoint."""
    import torch

    from trainer.checkpoint import make_meta, write_checkpoint
    from trainer.config import load_config
    from trainer.engine import TorchEngine
    from trainer.models import InputSpec, build_classifier

    cfg = load_config("synthetic-supervised", ["model.hidden=[16]", "data.generator_pool=100", "probe.samples=600"])
    run_dir = tmp / "runs" / "reprobed"
    for step in steps:
        torch.manual_seed(step)
        model = build_classifier(cfg, InputSpec(dim=cfg.data.dim), cfg.data.num_classes)
        write_checkpoint(TorchEngine(model, cfg.optim, torch.device("cpu")), cfg,
                         make_meta(step, 0, cfg.data.num_classes, InputSpec(dim=cfg.data.dim)),
                         run_dir / f"checkpoint_{step:08d}")
    return run_dir


def test_probing_a_run_twice_logs_each_checkpoint_step_once(tmp_path):
    from probes.pipeline import RUN_DIR_TAG
    from trainer import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = write_run(tmp_path, [100, 200, 300])
    exp = tracking.ensure_experiment(uri, "synthetic")
    run_id = tracking.create_run(uri, exp, "reprobed", tags={RUN_DIR_TAG: str(run_dir)})
    # the training run's probe actor had logged step 100 only (200 and 300 were left unprobed)
    trained = tracking.MetricLogger(uri, run_id)
    trained.log({"probe/r2_affine": 0.5}, 100)
    trained.close()
    tracking.end_run(uri, run_id, "FINISHED")

    env = {"MLFLOW_TRACKING_URI": uri}
    for attempt in (1, 2):
        proc = run_cli(["probe", run_id], cwd=tmp_path, env=env, timeout=300)
        assert proc.returncode == 0, f"attempt {attempt}: {proc.stderr[-2000:]}"
    keys = [k for k in tracking.latest_metrics(uri, run_id) if k.startswith("probe/") and k != "probe/seconds"]
    assert "probe/r2_affine" in keys and len(keys) >= 3, keys
    for key in keys:
        steps = [step for step, _ in tracking.metric_history(uri, run_id, key)]
        expected = [100, 200, 300]
        assert steps == expected, f"{key}: steps {steps}, expected each of {expected} once"
    # the value the run logged at step 100 is kept, not overwritten by a re-probe
    assert tracking.metric_history(uri, run_id, "probe/r2_affine")[0] == (100, 0.5)
    assert os.path.isdir(run_dir)
