"""What the MLflow UI browses, against a real sqlite MLflow store (no Ray): the run's classifier as a
logged model that loads without pickle and reproduces the checkpoint's logits, registration under a
name, the run's dataset, system metrics that stop with their thread, and a sweep's best child."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainer import model_logging, tracking
from trainer.checkpoint import load_classifier
from trainer.config import ConfigError, resolve, save_config
from trainer.engine import MODEL_FILE
from trainer.errors import UserError
from trainer.models import InputSpec, build_classifier

SMALL = {"model.hidden": [16, 16], "data.num_classes": 10, "optim.steps": 100, "optim.warmup_steps": 10}


def fake_checkpoint(folder: Path, cfg, step: int, seed: int) -> Path:
    """A complete checkpoint folder as write_checkpoint leaves it (weights, config, meta with sizes)."""
    torch.manual_seed(seed)
    spec = InputSpec(dim=cfg.data.dim)
    model = build_classifier(cfg, spec, cfg.data.num_classes)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults: eval mode must use them
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / MODEL_FILE)
    save_config(cfg, folder / "config.yaml")
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    meta = {"step": step, "samples_seen": step * cfg.optim.batch_size, "num_outputs": cfg.data.num_classes,
            "input_spec": {"dim": cfg.data.dim, "channels": None, "size": None}, "files": files}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def store(tmp_path, sqlite_uri):
    cfg = resolve("synthetic-fast", SMALL)
    run_id = tracking.open_run(cfg, sqlite_uri, "model-run")
    return cfg, sqlite_uri, run_id


def batch(dim: int) -> torch.Tensor:
    return torch.randn(32, dim, generator=torch.Generator().manual_seed(7))


def test_logged_model_reproduces_the_checkpoints_logits_without_pickle(tmp_path, store):
    import mlflow

    cfg, uri, run_id = store
    ckpt = fake_checkpoint(tmp_path / "run" / "checkpoint_00000050", cfg, 50, seed=1)
    logged = model_logging.log_classifier(uri, run_id, ckpt, name="final", roles=["final"])
    expected = load_classifier(ckpt)[0](batch(cfg.data.dim)).detach().numpy()

    # the files: MLmodel names our loader module, the weights are safetensors, nothing pickled
    files = tracking.download_model(uri, logged.model_uri, tmp_path / "dl")
    names = {p.relative_to(files).as_posix() for p in files.rglob("*") if p.is_file()}
    assert {"MLmodel", "data/classifier/model.safetensors", "data/classifier/config.yaml", "data/classifier/meta.json"} <= names, names
    assert not [n for n in names if n.endswith((".pkl", ".pt", ".pth", ".pt2", ".cloudpickle"))], names
    assert "loader_module: trainer.model_logging" in (files / "MLmodel").read_text()

    # MLflow's loader, and linrep's own (no MLflow loader at all): the same logits as the checkpoint
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(uri):
        pyfunc = mlflow.pyfunc.load_model(logged.model_uri)
    np.testing.assert_allclose(pyfunc.predict(batch(cfg.data.dim).numpy()), expected, rtol=1e-5, atol=1e-5)
    raw = pyfunc.get_raw_model()
    assert isinstance(raw, torch.nn.Module) and not raw.training
    np.testing.assert_allclose(raw(batch(cfg.data.dim)).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    own = model_logging.load_logged_model(uri, logged.model_uri)
    np.testing.assert_allclose(own(batch(cfg.data.dim)).detach().numpy(), expected, rtol=1e-5, atol=1e-5)

    # the signature: float32 [-1, d] in, float32 [-1, K] out
    sig = pyfunc.metadata.signature
    assert sig.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, cfg.data.dim)
    assert sig.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, cfg.data.num_classes)


def test_own_loader_refuses_a_model_that_names_another_loader(tmp_path, store):
    cfg, uri, run_id = store
    ckpt = fake_checkpoint(tmp_path / "run" / "checkpoint_00000050", cfg, 50, seed=1)
    logged = model_logging.log_classifier(uri, run_id, ckpt, name="final", roles=["final"])
    # an MLmodel edited in the store to load code from elsewhere: refused before anything is imported
    tracking.download_model(uri, logged.model_uri, tmp_path / "probe")
    edited = tmp_path / "edited"
    edited.mkdir()
    mlmodel = yaml.safe_load((tmp_path / "probe" / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"].update(loader_module="evil", code="code")
    (edited / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    import mlflow

    with mlflow.tracking._tracking_service.utils._use_tracking_uri(uri):
        client = mlflow.MlflowClient(uri)
        client.log_artifacts(run_id, str(edited), "edited-model")
    with pytest.raises(UserError, match="not a linrep classifier"):
        model_logging.load_logged_model(uri, f"runs:/{run_id}/edited-model")


def test_final_and_best_models_and_registration(tmp_path, store):
    cfg, uri, run_id = store
    cfg.tracking.register_model = "linrep-classifier"
    run_dir = tmp_path / "run"
    for step, seed in ((50, 1), (100, 2)):
        fake_checkpoint(run_dir / f"checkpoint_{step:08d}", cfg, step, seed)
    tracking.log_metrics(uri, run_id, {"probe/r2_affine": 0.9}, step=50)   # the best is not the last
    tracking.log_metrics(uri, run_id, {"probe/r2_affine": 0.7}, step=100)
    logged = model_logging.log_run_models(uri, run_id, run_dir, cfg, "probe/r2_affine")
    assert set(logged) == {"final", "best"}
    models = {m["name"]: m for m in tracking.logged_models(uri, run_id)}
    assert models["final"]["tags"][model_logging.STEP_TAG] == "100"
    assert models["best"]["tags"][model_logging.STEP_TAG] == "50"
    tags = tracking.get_run(uri, run_id).tags
    assert tags[model_logging.BEST_STEP_TAG] == "50" and tags["linrep.best_model_id"] == logged["best"].model_id
    # registered: the best one, as version 1 of the name asked for; it loads by that name
    assert logged["best"].registered_name == "linrep-classifier" and logged["best"].version == "1"
    assert logged["final"].version is None
    assert model_logging.log_run_models(uri, run_id, run_dir, cfg, "probe/r2_affine") == {}  # a rerun: no copies
    assert len(tracking.logged_models(uri, run_id)) == 2
    best = model_logging.load_logged_model(uri, "models:/linrep-classifier/1")
    expected = load_classifier(run_dir / "checkpoint_00000050")[0](batch(cfg.data.dim))
    torch.testing.assert_close(best(batch(cfg.data.dim)), expected)


def test_register_model_name_is_checked():
    with pytest.raises(ConfigError, match="register_model"):
        resolve("synthetic-fast", {"tracking.register_model": "../x y"})


def test_dataset_of_a_synthetic_run(store):
    cfg, uri, run_id = store
    record = model_logging.log_run_dataset(uri, run_id, cfg)
    model_logging.log_run_dataset(uri, run_id, cfg)  # a resume logs it again: still one input
    (found,) = tracking.run_datasets(uri, run_id)
    assert found["digest"] == record["digest"] and found["context"] == "training"
    assert found["source"]["uri"].startswith("synthetic://dgp?dim=5&num_classes=10")
    other = resolve("synthetic-fast", {**SMALL, "data.kappa": 20.0})
    assert model_logging.dataset_record(other)["digest"] != record["digest"]  # the data's own hash
    same = resolve("synthetic-fast", {**SMALL, "optim.lr": 0.001})
    assert model_logging.dataset_record(same)["digest"] == record["digest"]   # not the optimiser's


def test_a_dataset_another_run_inserted_meanwhile_is_linked_not_an_error(store):
    """A sweep's trials start together on the same data, and MLflow looks the dataset row up, then
    inserts it: the slower one's insert failed on the unique key and failed its trial (seen in CI;
    6 processes at once: 1 lost). Here a second writer inserts the row exactly between the
    look-up and the insert, every time: the log retries, finds that row and links the run to it."""
    import sqlite3
    import uuid

    from sqlalchemy import event
    from sqlalchemy.orm import Session

    cfg, uri, run_id = store
    exp_id = int(tracking.ensure_experiment(uri, cfg.experiment_name))
    raced = []

    def another_run_inserts_first(session, flush_context, instances):
        if raced or not any(type(o).__name__ == "SqlDataset" for o in session.new):
            return
        raced.append(True)
        with sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=20) as other:
            other.execute("INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, dataset_source_type,"
                          " dataset_source) VALUES (?, ?, 'shared', '0123abcd', 'synthetic', '{}')",
                          (uuid.uuid4().hex, exp_id))

    event.listen(Session, "before_flush", another_run_inserts_first)
    try:
        tracking.log_dataset(uri, run_id, name="shared", digest="0123abcd", source_type="synthetic",
                             source={"uri": "synthetic://dgp"})
    finally:
        event.remove(Session, "before_flush", another_run_inserts_first)
    assert raced  # the other insert did land between MLflow's look-up and its own insert
    assert [d["digest"] for d in tracking.run_datasets(uri, run_id)] == ["0123abcd"]


def test_system_metrics_are_logged_and_the_thread_stops(store):
    cfg, uri, run_id = store
    before = set(threading.enumerate())
    system = tracking.start_system_metrics(uri, run_id, interval_s=0.2)
    logger = tracking.MetricLogger(uri, run_id, background=True, flush_every_s=0.1)  # as on rank 0
    for step in range(1, 6):
        logger.log({"train/loss": 1.0 / step}, step)
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while not any(k.startswith("system/cpu") for k in tracking.latest_metrics(uri, run_id)):
        assert time.monotonic() < deadline, tracking.latest_metrics(uri, run_id)
        time.sleep(0.2)
    system.stop()
    logger.close()
    assert not system.thread or not system.thread.is_alive()
    keys = tracking.latest_metrics(uri, run_id)
    assert "system/system_memory_usage_percentage" in keys and "train/loss" in keys
    assert [s for s, _ in tracking.metric_history(uri, run_id, "train/loss")] == [1, 2, 3, 4, 5]
    # stopped within its first interval (a short training): the sample it took is still logged
    quick = tracking.start_system_metrics(uri, run_id, interval_s=30)
    time.sleep(0.3)
    stored = len(tracking.metric_history(uri, run_id, "system/cpu_utilization_percentage"))
    quick.stop()
    assert len(tracking.metric_history(uri, run_id, "system/cpu_utilization_percentage")) == stored + 1
    time.sleep(0.5)
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()
            and ("SystemMetrics" in t.name or "linrep-" in t.name)]
    assert not left, left


def test_sweep_parent_links_its_best_child(tmp_path, sqlite_uri):
    from tests.test_sweep import _fabricate_trials, plan_of
    from tune.summary import BEST_CHILD_TAG, NOTE_TAG, publish_summary
    from tune.sweep import open_sweep

    plan = plan_of(tmp_path, classes=[10, 100], seeds=2)
    parent = open_sweep(plan, sqlite_uri)
    # configuration C10 is best on average; within it, seed 1 is the better run
    finals = {t.key: {"probe/r2_affine": (0.9 if t.values["data.num_classes"] == 10 else 0.8) + 0.01 * t.seed}
              for t in plan.trials}
    _fabricate_trials(plan, sqlite_uri, parent, finals)
    summary, _ = publish_summary(plan, sqlite_uri, parent, out=lambda _: None)
    best_key = next(t.key for t in plan.trials if t.values["data.num_classes"] == 10 and t.seed == 1)
    best_id = next(t.run_id for t in summary.trials if t.trial.key == best_key)
    tags = tracking.get_run(sqlite_uri, parent).tags
    assert tags[BEST_CHILD_TAG] == best_id and tags["linrep.best_child_run_name"] == best_key
    exp_id = tracking.ensure_experiment(sqlite_uri, plan.experiment)
    assert f"[{best_key}](#/experiments/{exp_id}/runs/{best_id})" in tags[NOTE_TAG]
    import mlflow

    note = mlflow.MlflowClient(sqlite_uri).download_artifacts(parent, "summary/best_child.md", str(tmp_path))
    assert Path(note).read_text() == tags[NOTE_TAG]
