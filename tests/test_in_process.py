"""A run trained in the calling process (trainer.run.fit_in_process): what a sweep's one-worker
trial and `linrep train` of one CPU worker on this machine use instead of a Ray Train worker group.
Same checkpoints, resume, restarts and numbers; no Ray."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import list_checkpoints, read_meta
from trainer.config import load_config
from trainer.engine import MODEL_FILE
from trainer.errors import UserError
from trainer.loop import StopRequested, persist_checkpoint
from trainer.run import RunHandle, fit_in_process, runs_in_process, trains_here
from trainer.storage import locate

SMALL = ["model.hidden=[16]", "data.num_classes=10", "optim.batch_size=64", "run.checkpoint_every=20",
         "run.log_every=10", "optim.warmup_steps=10", "probe.enabled=false", "tracking.enabled=false", "run.keep_checkpoints=10"]


def _run(tmp_path: Path, steps: int, on_report=None, stop=None, extra: tuple = ()):
    cfg = load_config("synthetic-supervised", [*SMALL, f"optim.steps={steps}", *extra])
    handle = RunHandle(cfg, "run", locate(tmp_path / "run"), None, None)
    return fit_in_process(handle, on_report=on_report, stop=stop)


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / MODEL_FILE, weights_only=True)


def test_an_in_process_run_checkpoints_reports_and_resumes_to_the_same_weights(tmp_path):
    reports: list[dict] = []
    result = _run(tmp_path / "whole", 60, on_report=reports.append)
    assert result.error is None
    assert [r["step"] for r in reports] == [20, 40, 60] and all("train/loss" in r for r in reports)
    steps = [read_meta(p)["step"] for p in list_checkpoints(tmp_path / "whole" / "run")]
    assert steps == [20, 40, 60] and result.checkpoint_path.endswith("checkpoint_00000060")

    # the same run stopped after its step-40 report, then rerun: resumes from 40, lands on the same weights
    stop = threading.Event()
    with pytest.raises(StopRequested):
        _run(tmp_path / "split", 60, on_report=lambda m: m["step"] == 40 and stop.set(), stop=stop)
    resumed: list[dict] = []
    _run(tmp_path / "split", 60, on_report=resumed.append)
    assert [r["step"] for r in resumed] == [60]
    whole = _weights(tmp_path / "whole" / "run" / "checkpoint_00000060")
    split = _weights(tmp_path / "split" / "run" / "checkpoint_00000060")
    assert whole.keys() == split.keys()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-6)


def test_a_stop_ends_the_loop_and_keeps_the_checkpoints_already_written(tmp_path):
    stop = threading.Event()

    def stop_after_first(metrics: dict) -> None:
        stop.set()  # as Tune's stop would, from another thread, between two steps

    with pytest.raises(StopRequested):
        _run(tmp_path, 200, on_report=stop_after_first, stop=stop)
    assert [read_meta(p)["step"] for p in list_checkpoints(tmp_path / "run")] == [20]


def test_a_persisted_checkpoint_replaces_a_leftover_and_lands_meta_last(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / MODEL_FILE).write_bytes(b"x" * 100)
    (scratch / "config.yaml").write_text("{}")
    (scratch / "meta.json").write_text('{"step": 20, "files": {"model.pt": 100, "config.yaml": 2}}')
    target = tmp_path / "run" / "checkpoint_00000020"
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"from a crashed attempt")
    (target / MODEL_FILE).write_bytes(b"y" * 7)
    persist_checkpoint(scratch, locate(target))
    assert sorted(p.name for p in target.iterdir()) == ["config.yaml", "meta.json", MODEL_FILE]
    assert (target / MODEL_FILE).stat().st_size == 100
    assert [read_meta(p)["step"] for p in list_checkpoints(tmp_path / "run")] == [20]


@pytest.mark.parametrize("overrides, expected", [
    ([], True),
    (["run.workers=2"], False),
    (["optim.engine=deepspeed"], False),
])
def test_only_one_cpu_worker_on_the_torch_engine_trains_in_process(overrides, expected):
    assert runs_in_process(load_config("synthetic-supervised", overrides)) is expected


def test_a_sweep_picks_in_process_trials_and_refuses_them_where_they_cannot_run(tmp_path):
    import yaml

    from tune.spec import build_plan, load_spec
    from tune.sweep import trials_in_process

    def plan(**fields):
        spec = {"name": "t", "base": "synthetic-supervised", "overrides": {"optim.steps": 40, "optim.warmup_steps": 10},
                "classes": [10, 20], **fields}
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        s, text, where = load_spec(str(path))
        return build_plan(s, spec_text=text, where=str(where), storage=str(tmp_path / "sweeps"))

    assert trials_in_process(plan()) is True
    assert trials_in_process(plan(resources={"in_process": False})) is False
    assert trials_in_process(plan(resources={"workers": 2})) is False
    # where a trial trains changes no figure: a resume may switch it
    assert plan(resources={"in_process": False}).fingerprint() == plan().fingerprint()
    with pytest.raises(UserError, match="resources.in_process=true needs one CPU worker"):
        trials_in_process(plan(resources={"workers": 2, "in_process": True}))


def test_probes_on_a_thread_of_the_training_process_probe_every_due_checkpoint(tmp_path):
    """probes.actor.LocalProbe: an in-process trial's probes, queued while training goes on and
    drained at the end, with the actor's ledger (each due checkpoint done once) and figures."""
    from probes.actor import LocalProbe
    from probes.attempts import read_ledger
    from probes.pipeline import start_probes

    cfg = load_config("synthetic-supervised", [*SMALL, "optim.steps=60", "probe.enabled=true", "probe.samples=512"])
    handle = RunHandle(cfg, "run", locate(tmp_path / "run"), None, None)
    probe = start_probes(handle, in_process=True)
    assert isinstance(probe, LocalProbe)
    try:
        assert fit_in_process(handle, probes=probe).error is None
        results = probe.drain(timeout_s=120)
    finally:
        probe.close()
    assert sorted(results) == [20, 40, 60]
    assert all(0.0 <= r["probe/r2_affine"] <= 1.0 for r in results.values())
    assert {step: entry["state"] for step, entry in read_ledger(locate(tmp_path / "run")).items()} == \
        {20: "done", 40: "done", 60: "done"}


@pytest.mark.parametrize("max_failures", [1, 0])
def test_a_failed_attempt_restarts_from_the_newest_checkpoint_up_to_max_failures(tmp_path, max_failures):
    """A worker failure after the step-40 checkpoint: with run.max_failures=1 the worker is rebuilt,
    restores 40 and lands on the weights of a run that never failed, every train/loss step in MLflow
    once; with 0 the run fails, in one line."""
    from trainer.run import prepare_run
    from trainer.tracking import metric_history

    _run(tmp_path / "whole", 60)
    reports: list[int] = []

    def fail_once_at_40(metrics: dict) -> None:
        reports.append(metrics["step"])
        if reports == [20, 40]:
            raise RuntimeError("injected worker fault")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("synthetic-supervised", [*SMALL, "optim.steps=60", f"run.max_failures={max_failures}",
                                               "tracking.enabled=true", f"tracking.uri={uri}", "run.name=faulty",
                                               f"run.storage={tmp_path / 'faulty'}"])
    handle = prepare_run(cfg)
    result = fit_in_process(handle, on_report=fail_once_at_40)
    if max_failures == 0:
        assert result.error == "RuntimeError: injected worker fault" and reports == [20, 40]
        return
    assert result.error is None and reports == [20, 40, 60]  # the restart resumed from 40, not from 0
    whole = _weights(tmp_path / "whole" / "run" / "checkpoint_00000060")
    restarted = _weights(tmp_path / "faulty" / "faulty" / "checkpoint_00000060")
    for name in whole:
        torch.testing.assert_close(restarted[name], whole[name], rtol=1e-5, atol=1e-6)
    assert [step for step, _ in metric_history(uri, handle.run_id, "train/loss")] == [10, 20, 30, 40, 50, 60]


@pytest.mark.parametrize("overrides, address, env, expected", [
    ([], None, None, True),
    (["run.in_process=false"], None, None, False),
    (["run.workers=2"], None, None, False),
    (["probe.actor_cpus=1"], None, None, False),
    (["probe.actor_cpus=1", "probe.enabled=false"], None, None, True),
    ([], "10.0.0.5:6379", None, False),
    ([], None, "10.0.0.5:6379", False),
    (["run.in_process=true"], None, None, True),
    (["run.in_process=true", "optim.engine=deepspeed"], None, None, "deepspeed engine"),
    (["run.in_process=true", "probe.actor_gpus=1"], None, None, "probe.actor_"),
    (["run.in_process=true"], None, "10.0.0.5:6379", "given a Ray cluster"),
])
def test_linrep_train_trains_in_its_own_process_only_on_this_machine(monkeypatch, overrides, address, env, expected):
    """run.in_process: a one-worker CPU run without a cluster address trains in the command's process;
    true where that is impossible is refused in one line naming why."""
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config("synthetic-supervised", overrides)
    if isinstance(expected, str):
        with pytest.raises(UserError, match=expected):
            trains_here(cfg, address)
    else:
        assert trains_here(cfg, address) is expected


def test_run_in_process_does_not_rename_a_run():
    """Where a run trains changes no figure: its automatic name (and so its resume) stays the same."""
    names = {load_config("synthetic-supervised", [f"run.in_process={v}"]).run_name() for v in ("true", "false", "null")}
    assert len(names) == 1 and names == {load_config("synthetic-supervised", []).run_name()}


CLI_SMALL = ["optim.steps=120", "run.checkpoint_every=40", "run.log_every=20", "probe.samples=1024",
             "data.generator_pool=1000", "model.hidden=[32,32]", "optim.warmup_steps=10", "run.name=cli"]


def test_linrep_train_in_its_own_process_matches_ray_train_to_the_weights(tmp_path, shared_ray):
    """The real CLI twice on the same config and seed: in its own process (no RAY_ADDRESS: no Ray is
    started) and through Ray Train (run.in_process=false, the session's Ray). Same checkpoints, same
    weights (CPU, one thread each: the same arithmetic), same probe figures in MLflow, both FINISHED."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import run_cli

    runs = {}
    for name, extra, env in [("here", [], None), ("ray", ["run.in_process=false"], shared_ray)]:
        cwd = tmp_path / name
        cwd.mkdir()
        if env is None:
            proc = run_cli(["train", "synthetic-supervised", *CLI_SMALL], cwd, env={"RAY_ADDRESS": ""})
        else:
            proc = run_cli(["train", "synthetic-supervised", *CLI_SMALL, *extra], cwd, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        uri = f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}"
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("synthetic").experiment_id])
        assert run.info.status == "FINISHED"
        runs[name] = (proc, cwd / "ray_results" / "cli", run)
    here_out = runs["here"][0].stdout
    assert "training in this process" in here_out and "training in this process" not in runs["ray"][0].stdout
    assert "[linrep] step 120/120" in here_out  # progress reaches the console without Ray's log stream
    assert (runs["here"][1] / "linrep.log").is_file()
    for step in (40, 80, 120):
        a = _weights(runs["here"][1] / f"checkpoint_{step:08d}")
        b = _weights(runs["ray"][1] / f"checkpoint_{step:08d}")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    here_m, ray_m = runs["here"][2].data.metrics, runs["ray"][2].data.metrics
    assert here_m["probe/r2_affine"] == pytest.approx(ray_m["probe/r2_affine"], abs=1e-4)


@pytest.mark.parametrize("wait", [True, False])
def test_stop_wait_ends_the_run_at_the_checkpoint_whose_probe_reached_stop_at(tmp_path, wait):
    """run.stop_wait: training waits for each checkpoint's probe, so a stop rule the first probe meets
    ends the run at that first checkpoint. Without it the probe of a checkpoint is never in when that
    checkpoint is reported, so the run goes on to at least the next one."""
    from probes.actor import LocalProbe

    cfg = load_config("synthetic-supervised", [*SMALL, "optim.steps=200", "probe.enabled=true", "probe.samples=512",
                                               "run.stop_at={probe/r2_affine: -100.0}", f"run.stop_wait={wait}"])
    probes = LocalProbe(None, None, cfg)
    reports: list[dict] = []
    try:
        result = fit_in_process(RunHandle(cfg, "run", locate(tmp_path / "run"), None, None), probes=probes,
                                on_report=reports.append)
    finally:
        probes.close()
    assert result.error is None
    steps = [r["step"] for r in reports]
    assert steps == [20] if wait else steps[-1] > 20


def test_stop_wait_needs_a_stop_rule():
    with pytest.raises(Exception, match="run.stop_wait=true waits for probes to apply run.stop_at"):
        load_config("synthetic-supervised", ["run.stop_wait=true"])
    named = load_config("synthetic-supervised", []).run_name()
    assert load_config("synthetic-supervised", ["run.stop_wait=false"]).run_name() == named   # names kept
    assert load_config("synthetic-supervised", ["run.stop_at={probe/r2_affine: 0.9}", "run.stop_wait=true"]
                       ).run_name() != load_config("synthetic-supervised", ["run.stop_at={probe/r2_affine: 0.9}"]).run_name()
