"""Sweeps: spec validation (before Ray starts), the plan, the summary, and real sweeps through
Ray Tune with a real MLflow sqlite store: parent + child runs, artifacts, two trials at a time,
a sweep whose driver is killed mid-way and resumed by rerunning the same command, and ASHA
stopping trials early (their Train runs aborted, their CPUs freed)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import LINREP, run_linrep
from trainer import tracking
from trainer.errors import UserError
from tune.spec import build_plan, load_spec, parse_spec
from tune.folder import STATE_FILE, TrialLedger
from trainer.cluster import Node
from tune.sweep import open_sweep, trial_concurrency

SMALL = {"optim.steps": 200, "optim.warmup_steps": 10, "run.checkpoint_every": 100, "run.log_every": 50,
         "model.hidden": [32, 32], "data.generator_pool": 500, "probe.samples": 1024}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_spec(path: Path, **fields) -> Path:
    spec = {"name": "t", "base": "synthetic-supervised", "overrides": dict(SMALL), **fields}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def plan_of(tmp_path: Path, **fields):
    spec, text, path = load_spec(str(write_spec(tmp_path / "spec.yaml", **fields)))
    return build_plan(spec, spec_text=text, where=str(path), storage=str(tmp_path / "sweeps"))


# ---- the plan ------------------------------------------------------------------------------
def test_ci_grid_plan_is_the_grid_times_seeds_with_stable_names(tmp_path):
    spec, text, path = load_spec("ci-grid")
    plan = build_plan(spec, spec_text=text, storage=str(tmp_path))
    assert len(plan.trials) == 8 and len(plan.groups()) == 4
    assert plan.swept == ["data.num_classes", "data.kappa"]
    keys = [t.key for t in plan.trials]
    assert len(set(keys)) == 8 and keys[0] == "ci-grid-C10-k5-s0" and keys[-1] == "ci-grid-C50-k10-s1"
    t = plan.trial("ci-grid-C50-k5-s1")
    assert t.values == {"data.num_classes": 50, "data.kappa": 5} and t.seed == 1
    assert t.overrides["run.seed"] == 1 and t.overrides["run.workers"] == 1 and t.overrides["optim.steps"] == 200
    again = build_plan(load_spec("ci-grid")[0], storage=str(tmp_path))
    assert again.fingerprint() == plan.fingerprint() and [t.key for t in again.trials] == keys


def test_first_class_axes_map_to_config_keys(tmp_path):
    plan = plan_of(tmp_path, classes=[10, 20], kappa={"grid": [5.0]}, beta={"grid": [1.0, 10.0]},
                   learn_beta={"grid": [False, True]}, seeds=[3])
    assert plan.swept == ["data.num_classes", "data.kappa", "model.temperature", "model.learn_temperature"]
    assert len(plan.trials) == 2 * 1 * 2 * 2
    from tune.spec import trial_config

    cfg = trial_config(plan.trials[-1])
    assert (cfg.data.num_classes, cfg.data.kappa, cfg.model.temperature, cfg.model.learn_temperature) == (20, 5.0, 10.0, True)
    assert cfg.run.seed == 3 and cfg.data_seed == 3 and cfg.run.name == plan.trials[-1].key


def test_random_draws_are_seeded_in_range_and_typed(tmp_path):
    fields = dict(classes={"loguniform": [10, 1000]}, space={"optim.lr": {"loguniform": [1e-4, 1e-2]},
                  "data.conditional": {"choice": ["vmf", "normal"]}}, num_samples=4, seeds=2)
    a = plan_of(tmp_path, **fields)
    b = plan_of(tmp_path, **fields)
    c = plan_of(tmp_path, **fields, sample_seed=1)
    assert len(a.trials) == 8 and len(a.groups()) == 4
    assert [t.overrides for t in a.trials] == [t.overrides for t in b.trials]
    assert [t.values for t in a.trials] != [t.values for t in c.trials]
    for t in a.trials:
        assert isinstance(t.values["data.num_classes"], int) and 10 <= t.values["data.num_classes"] <= 1000
        assert 1e-4 <= t.values["optim.lr"] <= 1e-2
        assert t.values["data.conditional"] in ("vmf", "normal")


def test_trial_concurrency_fits_the_cluster(tmp_path):
    one = lambda cpus, gpus=0.0: [Node("127.0.0.1", cpus, gpus, True)]  # noqa: E731
    plan = plan_of(tmp_path, classes=[10, 20, 30], seeds=2)
    assert trial_concurrency(plan, one(2.0)) == 2
    plan.max_concurrent = 1
    assert trial_concurrency(plan, one(2.0)) == 1
    plan.max_concurrent = None
    plan.resources = {"workers": 2, "cpus_per_worker": 1.0, "use_gpu": False}
    assert trial_concurrency(plan, one(8.0)) == 4
    with pytest.raises(UserError, match="one trial needs 2 workers x 1 CPU = 2 CPUs; the cluster has 1 CPUs"):
        trial_concurrency(plan, one(1.0))
    # per node: two 1-CPU nodes hold two 1-CPU workers, not one 2-CPU worker
    plan.resources = {"workers": 1, "cpus_per_worker": 2.0, "use_gpu": False}
    with pytest.raises(UserError, match="must fit on one node"):
        trial_concurrency(plan, [Node("10.0.0.1", 1.0, 0, True), Node("10.0.0.2", 1.0)])
    assert trial_concurrency(plan, [Node("10.0.0.1", 1.0, 0, True), Node("10.0.0.2", 1.0)], grows=True) == 6
    plan.resources = {"workers": 1, "cpus_per_worker": 1.0, "use_gpu": True}
    assert trial_concurrency(plan, one(16.0, 3.0)) == 3
    with pytest.raises(UserError, match="GPU"):
        trial_concurrency(plan, one(16.0))


# ---- spec errors: one line naming the key, before Ray starts -----------------------------------
SPEC_ERRORS = [
    (dict(spaces={}), "unknown key 'spaces'"),
    (dict(space={"data.kapa": [1.0]}), "space.data.kapa: 'data.kapa' is not a config key"),
    (dict(space={"data": [1]}), "space.data: 'data' must name a section and a field"),
    (dict(kappa={"grid": []}), "'kappa': empty grid"),
    (dict(space={"data.kappa": []}), "'space.data.kappa': empty grid"),
    (dict(beta={"loguniform": [0, 10]}), "'beta': bad range [0.0, 10.0]"),
    (dict(space={"optim.lr": {"uniform": [0.1, 0.01]}}), "'space.optim.lr': bad range"),
    (dict(kappa={"grid": [5, -1]}), "kappa: value -1 is refused by data.kappa"),
    (dict(classes={"grid": [1]}), "classes: value 1 is refused by data.num_classes"),
    (dict(space={"optim.lr": {"grid": [1e-3], "uniform": [0.1, 0.2]}}), "exactly one of"),
    (dict(space={"run.seed": [1, 2]}), "use `seeds`"),
    (dict(space={"run.workers": [1, 2]}), "set by resources"),
    (dict(space={"data.conditional": {"uniform": [0, 1]}}), "needs a numeric key; 'data.conditional' takes one of vmf,"),
    (dict(classes=[10], space={"data.num_classes": [20]}), "repeats the first-class axis 'classes'"),
    (dict(num_samples=2), "num_samples: 2 > 1 needs a random dimension"),
    (dict(seeds=0), "'seeds'"),
    (dict(metric="accuracy"), "'metric': 'accuracy' is not a reported metric"),
    (dict(scheduler={"asha": {"grace_period": 500, "max_t": 100}}), "grace_period: 500 > max_t=100"),
    (dict(scheduler={"hyperband": {}}), "'scheduler': {\"hyperband\": {}} is not a scheduler: give fifo, or {asha"),
    (dict(resources={"gpus": 1}), "unknown key 'resources.gpus'"),
    (dict(base="no-such-preset"), "base: unknown preset or file 'no-such-preset'"),
    (dict(overrides={"optim.lrr": 1}), "overrides.optim.lrr: 'optim.lrr' is not a config key"),
    (dict(overrides={"optim.steps": 0}), "overrides: config key 'optim.steps' = 0"),
    (dict(name="a/b"), "'name'"),
    # a combination the config refuses (cross-field): named by its trial configuration
    (dict(base="synthetic-diet", classes=[100, 5000]), "trial num_classes=5000: data.num_instances=1000 < data.num_classes=5000"),
]


@pytest.mark.parametrize("fields,expected", SPEC_ERRORS, ids=[e[1][:40] for e in SPEC_ERRORS])
def test_invalid_specs_are_refused_naming_the_key(tmp_path, fields, expected):
    with pytest.raises(UserError) as err:
        plan_of(tmp_path, **fields)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "spec.yaml") in msg
    assert expected in msg, msg


def test_bad_yaml_and_missing_spec_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nspace: {data.kappa: [1, 2\n")
    with pytest.raises(UserError, match=r"bad.yaml is not valid YAML at line"):
        load_spec(str(bad))
    with pytest.raises(UserError, match="unknown sweep spec 'nope' .*ci-grid"):
        load_spec("nope")
    with pytest.raises(UserError, match="missing key 'base'"):
        parse_spec({"name": "x"}, "inline")


def test_image_dataset_needs_partition_labels_to_sweep_classes(tmp_path):
    fields = dict(base="synthetic-supervised", classes=[4, 8])
    fields["overrides"] = {**SMALL, "data.dataset": "dsprites", "data.root": str(tmp_path), "data.labels": "factor"}
    with pytest.raises(UserError, match="classes: data.labels=factor fixes the number of classes .*partition"):
        spec, text, path = load_spec(str(write_spec(tmp_path / "spec.yaml", **fields)))
        build_plan(spec, where=str(path), storage=str(tmp_path))


def test_cli_refuses_a_bad_spec_with_exit_2_before_ray_starts(tmp_path):
    spec = write_spec(tmp_path / "bad.yaml", space={"data.kapa": [1.0, 2.0]})
    t0 = time.time()
    out = run_linrep(["sweep", str(spec)], cwd=tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "space.data.kapa" in lines[0] and lines[0].startswith("linrep: error: sweep spec")
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlruns").exists()
    assert time.time() - t0 < 60
    out = run_linrep(["sweep", "ci-grid", "optim.nope=1"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "override 'optim.nope=1'" in out.stderr and "Traceback" not in out.stderr


# ---- the sweep folder and the summary, on a real sqlite store (no Ray) ---------------------------
def test_a_changed_spec_under_the_same_name_is_refused(tmp_path, sqlite_uri):
    plan = plan_of(tmp_path, classes=[10, 20])
    parent = open_sweep(plan, sqlite_uri)
    assert open_sweep(plan, sqlite_uri) == parent  # unchanged: the same parent run
    state = json.loads((plan.sweep_dir / STATE_FILE).read_text())
    assert state["parent_run_id"] == parent and state["trials"] == 2
    changed = plan_of(tmp_path, classes=[10, 30])
    with pytest.raises(UserError, match="different spec"):
        open_sweep(changed, sqlite_uri)
    (plan.sweep_dir / STATE_FILE).unlink()  # the folder is gone but MLflow still has that sweep
    with pytest.raises(UserError, match="already holds a sweep of that name"):
        open_sweep(plan, sqlite_uri)


def _fabricate_trials(plan, uri, parent, finals: dict[str, dict[str, float]]):
    """Child runs + ledgers as trials would leave them (real MLflow, no training)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from trainer.tracking import RUN_KEY_TAG

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(plan.experiment).experiment_id
    for t in plan.trials:
        run = client.create_run(exp, run_name=t.key, tags={RUN_KEY_TAG: t.key, "mlflow.parentRunId": parent})
        final = finals[t.key]
        for step, frac in ((100, 0.5), (200, 1.0)):
            client.log_batch(run.info.run_id, metrics=[Metric(k, v * frac, 0, step) for k, v in final.items()])
        client.set_terminated(run.info.run_id, "FINISHED")
        ledger = TrialLedger(plan.sweep_dir, t.key)
        ledger.start(run.info.run_id, 0)
        ledger.end("finished", final=final, step=200)


def test_summary_is_mean_and_std_over_seeds_with_valid_pngs(tmp_path, sqlite_uri):
    from tune.summary import publish_summary

    plan = plan_of(tmp_path, classes=[10, 100, 1000], kappa=[5.0, 10.0], seeds=3)
    parent = open_sweep(plan, sqlite_uri)
    finals = {t.key: {"probe/r2_affine": 0.9 - 0.01 * t.seed - 0.001 * t.values["data.num_classes"] / 10,
                      "probe/r2_w": 0.5 + 0.1 * t.seed, "probe/sv_mae": 0.1, "probe/seconds": 1.0}
              for t in plan.trials}
    _fabricate_trials(plan, sqlite_uri, parent, finals)
    lines = []
    summary, paths = publish_summary(plan, sqlite_uri, parent, out=lines.append)
    assert len(summary.rows) == 6 and all(r["n"] == 3 for r in summary.rows)
    row = next(r for r in summary.rows if r["data.num_classes"] == 100 and r["data.kappa"] == 10.0)
    vals = [finals[t.key]["probe/r2_affine"] for t in plan.trials if t.group == row["configuration"]]
    assert row["probe/r2_affine_mean"] == pytest.approx(sum(vals) / 3)
    assert row["probe/r2_affine_std"] == pytest.approx(0.01)  # seeds 0, 1, 2 -> sample std of 0, .01, .02
    assert row["probe/r2_w_std"] == pytest.approx(0.1)
    assert "probe/seconds" not in summary.figures
    assert summary.best()["data.num_classes"] == 10
    names = sorted(p.relative_to(plan.sweep_dir).as_posix() for p in paths)
    assert names == ["plots/learning_curves.png", "plots/r2_vs_kappa.png", "plots/r2_vs_num_classes.png",
                     "summary/summary.csv", "summary/summary.md"]
    import matplotlib.image as mpimg

    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC and mpimg.imread(p).shape[0] > 100
    import pandas as pd

    frame = pd.read_csv(plan.sweep_dir / "summary" / "summary.csv")
    assert list(frame["n"]) == [3] * 6 and "probe/r2_affine_std" in frame.columns
    md = (plan.sweep_dir / "summary" / "summary.md").read_text()
    assert "| num_classes=100 kappa=10 | 3 |" in md and " ± 0.0100 " in md and md in "\n".join(lines) + "\n"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(sqlite_uri)
    arts = {a.path for d in ("summary", "plots") for a in client.list_artifacts(parent, d)}
    assert {"summary/summary.csv", "summary/summary.md", "plots/r2_vs_num_classes.png",
            "plots/learning_curves.png"} <= arts
    parent_run = client.get_run(parent)
    assert parent_run.data.tags["linrep.best_configuration"] == summary.best()["configuration"]
    assert {"sweep_spec.yaml", "sweep_plan.json"} <= {a.path for a in client.list_artifacts(parent)}


# ---- real sweeps through Ray Tune -----------------------------------------------------------------
def _mlflow(tmp_path: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("synthetic")
    return client, exp.experiment_id


def _intervals(sweep_dir: Path) -> list[tuple[float, float]]:
    out = []
    for f in (sweep_dir / "trials").glob("*.json"):
        for a in json.loads(f.read_text())["attempts"]:
            out.append((a["start"], a["end"]))
    return out


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def check_finished_sweep(tmp_path: Path, name: str, n_trials: int, out: subprocess.CompletedProcess | None = None):
    """Parent + n child runs FINISHED, metrics at their steps, summary artifacts valid PNGs."""
    client, exp = _mlflow(tmp_path)
    parents = client.search_runs([exp], filter_string=f"tags.`linrep.sweep` = '{name}' and tags.`linrep.role` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == n_trials and {c.info.status for c in children} == {"FINISHED"}
    for c in children:
        assert c.data.params["optim.steps"] == "200" and "data.num_classes" in c.data.params
        assert [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")] == [50, 100, 150, 200]
        assert sorted(m.step for m in client.get_metric_history(c.info.run_id, "probe/r2_affine")) == [100, 200]
    arts = {a.path for d in ("summary", "plots") for a in client.list_artifacts(parent, d)}
    assert {"summary/summary.csv", "summary/summary.md", "plots/learning_curves.png",
            "plots/r2_vs_num_classes.png"} <= arts
    local = client.download_artifacts(parent, "plots", str(tmp_path / "dl"))
    for png in Path(local).glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    if out is not None:
        assert "| configuration | n | r2_affine |" in out.stdout
    # tracking.log_models unset: the trials log no models, the best child (linked) gets them at the end
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    best = client.get_run(parent).data.tags["linrep.best_child_run_id"]
    with_models = {c.info.run_id for c in children if tracking.logged_models(uri, c.info.run_id)}
    assert with_models == {best}, (with_models, best, [l for l in (out.stderr if out else "").splitlines()
                                                       if "warning" in l.lower()][-5:])
    return parent, children


@pytest.mark.slow
def test_ci_grid_2x2x2_runs_two_at_a_time_and_summarises_in_mlflow(tmp_path, shared_ray):
    """The figure: a 2x2 grid x 2 seeds sweep on 2 cores runs trials two at a time; summary in MLflow."""
    out = run_linrep(["sweep", "ci-grid"], cwd=tmp_path, env=shared_ray, timeout=1500)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    for noise in ("(raylet)", "PlacementGroupCleaner", "Reporting training result"):  # Ray's lines: the log's
        assert noise not in out.stdout + out.stderr, (noise, (out.stdout + out.stderr)[-3000:])
    check_finished_sweep(tmp_path, "ci-grid", 8, out)
    sweep_dir = tmp_path / "ray_results" / "sweeps" / "ci-grid"
    spans = _intervals(sweep_dir)
    assert len(spans) == 8 and max_overlap(spans) == 2  # both cores busy, never oversubscribed
    assert (sweep_dir / "plots" / "r2_vs_kappa.png").is_file()
    ledgers = [json.loads(p.read_text()) for p in (sweep_dir / "trials").glob("*.json")]
    assert len(ledgers) == 8 and all(d["status"] == "finished" and len(d["attempts"]) == 1 for d in ledgers)
    rows = list(csv.DictReader((sweep_dir / "summary" / "summary.csv").read_text().splitlines()))
    assert sorted((int(r["data.num_classes"]), float(r["data.kappa"]), int(r["n"])) for r in rows) == \
        [(10, 5.0, 2), (10, 10.0, 2), (50, 5.0, 2), (50, 10.0, 2)]


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, shared_ray):
    """Kill the driver (and its Ray) once a short trial has finished and a long one has checkpoints;
    the same command then resumes: the finished trial is not rerun, the other resumes from its last
    checkpoint, the parent run is reused, and every metric step is in MLflow exactly once."""
    from trainer.checkpoint import list_checkpoints, read_meta

    spec = write_spec(tmp_path / "resume.yaml", name="resume", space={"optim.steps": [200, 2400]},
                      max_concurrent=2)
    spec_text = yaml.safe_load(spec.read_text())
    spec_text["overrides"].update({"run.checkpoint_every": 200, "run.log_every": 100, "model.hidden": [64, 64]})
    spec.write_text(yaml.safe_dump(spec_text))
    sweep_dir = tmp_path / "ray_results" / "sweeps" / "resume"
    short, long = "resume-T200-s0", "resume-T2400-s0"
    proc = subprocess.Popen([*LINREP, "sweep", str(spec)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    long_dir = sweep_dir / "runs" / long
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            steps = [read_meta(p)["step"] for p in list_checkpoints(long_dir)] if long_dir.is_dir() else []
            if TrialLedger(sweep_dir, short).status == "finished" and steps and max(steps) >= 400:
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"sweep ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = max(read_meta(p)["step"] for p in list_checkpoints(long_dir))
    assert 400 <= killed_at < 2400 and TrialLedger(sweep_dir, long).status == "running"
    parent_before = json.loads((sweep_dir / STATE_FILE).read_text())["parent_run_id"]
    short_ledger_before = (sweep_dir / "trials" / f"{short}.json").read_text()
    time.sleep(3)

    # the rerun joins the session's Ray (conftest.shared_ray) instead of starting its own (3-14 s on 2
    # cores, by load): it resumes from the sweep folder and the MLflow store; only the killed driver owned its Ray
    out = run_linrep(["sweep", str(spec)], cwd=tmp_path, env=shared_ray, timeout=900)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "resuming resume" in out.stderr
    assert json.loads((sweep_dir / STATE_FILE).read_text())["parent_run_id"] == parent_before
    short_ledger = json.loads((sweep_dir / "trials" / f"{short}.json").read_text())
    long_ledger = json.loads((sweep_dir / "trials" / f"{long}.json").read_text())
    assert len(short_ledger["attempts"]) == 1 and short_ledger == json.loads(short_ledger_before)  # not rerun
    resumed = [a["resume_step"] for a in long_ledger["attempts"]]
    assert len(resumed) == 2 and resumed[0] == 0 and resumed[1] >= killed_at  # from its last checkpoint
    assert long_ledger["status"] == "finished"

    client, exp = _mlflow(tmp_path)
    parents = client.search_runs([exp], filter_string="tags.`linrep.role` = 'sweep'")
    assert [p.info.run_id for p in parents] == [parent_before] and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_before}'")
    assert sorted(c.info.run_name for c in children) == sorted([short, long])
    assert {c.info.status for c in children} == {"FINISHED"}
    for c in children:
        total = int(c.data.params["optim.steps"])
        loss_steps = [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")]
        assert loss_steps == sorted(set(loss_steps)) and sorted(loss_steps) == list(range(100, total + 1, 100))
        probe_steps = sorted(m.step for m in client.get_metric_history(c.info.run_id, "probe/r2_affine"))
        assert probe_steps == list(range(200, total + 1, 200))
    summary = (sweep_dir / "summary" / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and all(",1,0,0," in line for line in summary[1:])


@pytest.mark.slow
@pytest.mark.parametrize("in_process", [True, False], ids=["in-process", "ray-train"])
def test_asha_stops_bad_trials_early_and_frees_their_cpus(tmp_path, shared_ray, in_process):
    """ASHA on a probe metric: the two tiny learning rates are stopped at the first rung; their
    runs end (in-process: at the stopped report, the kept trial process takes the next trial; Ray
    Train: the controller aborted), their CPUs are freed for the next trial, their child runs KILLED."""
    from trainer.checkpoint import list_checkpoints, read_meta

    spec = write_spec(tmp_path / "asha.yaml", name="asha", space={"optim.lr": [0.01, 0.003, 1e-7, 2e-7]},
                      scheduler={"asha": {"grace_period": 200, "reduction_factor": 2}}, max_concurrent=2,
                      resources={"workers": 1, "cpus_per_worker": 1, "in_process": in_process})
    raw = yaml.safe_load(spec.read_text())
    # long enough that the stop lands mid-run: a trial now trains ~1,000 steps in ~15 s, and ASHA
    # sees a probe one checkpoint late and the abort takes a few seconds more
    raw["overrides"].update({"optim.steps": 2500})
    spec.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    out = run_linrep(["sweep", str(spec)], cwd=tmp_path, env=shared_ray, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "WorkerGroupStartupTimeout" not in out.stdout + out.stderr  # no leaked CPUs
    sweep_dir = tmp_path / "ray_results" / "sweeps" / "asha"
    status = {k: TrialLedger(sweep_dir, k).status for k in ("asha-lr0.01-s0", "asha-lr0.003-s0",
                                                             "asha-lr1e-07-s0", "asha-lr2e-07-s0")}
    # the tiny rates reach the first rung after both good ones recorded theirs: below the cutoff.
    # (Which good one finishes depends on which reached a rung first: ASHA compares with what is there.)
    assert status["asha-lr1e-07-s0"] == status["asha-lr2e-07-s0"] == "stopped", status
    assert "finished" in (status["asha-lr0.01-s0"], status["asha-lr0.003-s0"]), status
    for key in ("asha-lr1e-07-s0", "asha-lr2e-07-s0"):
        last = max(read_meta(p)["step"] for p in list_checkpoints(sweep_dir / "runs" / key))
        print(f"{key} stopped after step {last}")
        assert last < 2500, (key, last)
    client, exp = _mlflow(tmp_path)
    runs = {r.info.run_name: r.info.status for r in client.search_runs([exp])}
    assert runs["asha-lr1e-07-s0"] == runs["asha-lr2e-07-s0"] == "KILLED" and runs["asha"] == "FINISHED"
    ledgers = [json.loads((sweep_dir / "trials" / f"{k}.json").read_text()) for k in status]
    assert not any("error" in d for d in ledgers)  # a stop is not a failure
    assert "| lr=1e-07 | 0 (+1 stopped) |" in out.stdout
    assert time.time() - t0 < 900
