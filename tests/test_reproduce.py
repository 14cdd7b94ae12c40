"""`linrep reproduce synthetic`: the paper's one-factor-at-a-time grids, the step budget, the
table in the paper's layout, and (slow) the --quick preset end to end under 15 minutes."""

from __future__ import annotations

import dataclasses
import math

import pytest

from tests.conftest import run_linrep
from trainer.errors import UserError
from tune.reproduce import (ARM_STEPS, DEFAULTS, QUICK_STEPS, build_reproduce_plan, paper_table, plan_table,
                            reproduce_name)
from tune.spec import trial_config
from tune.summary import Summary, TrialRow, summarise

AXIS_VALUES = {"data.num_instances": {1000, 10_000}, "data.dim": {5, 10, 20}, "data.num_classes": {10, 100, 1000, 10_000},
               "data.kappa": {5.0, 10.0, 50.0}, "data.cluster_marginal": {"uniform", "laplace", "normal"},
               "data.conditional": {"vmf", "laplace", "normal"}}


def changed_axes(values: dict) -> set[str]:
    return {k for k, v in DEFAULTS.items() if values.get(k) != v}


def test_paper_grid_covers_every_axis_of_both_public_scripts_in_every_arm(tmp_path):
    plan = build_reproduce_plan(storage=str(tmp_path))
    assert plan.name == "reproduce-synthetic" and plan.kind == "reproduce"
    assert len(plan.groups()) == 3 * 13 and len(plan.trials) == 3 * 13 * 5
    for arm in ("supervised", "diet-unit", "diet-free"):
        values = [t.values for t in plan.trials if t.values["arm"] == arm]
        for axis, wanted in AXIS_VALUES.items():
            assert {v[axis] for v in values} == wanted, (arm, axis)
    for t in plan.trials:  # one factor at a time (DIET's |C| = 10^4 also needs N >= |C|)
        changed = changed_axes(t.values)
        allowed = 2 if t.values["setting"] == "|C| = 10^4" and t.values["arm"] != "supervised" else 1
        assert len(changed) == (0 if t.values["setting"] == "default" else allowed), (t.key, changed)
    cfg = trial_config(plan.trial("reproduce-synthetic-c4-mnormal-s4"))
    assert cfg.model.case == "C4" and cfg.data.cluster_marginal == "normal" and cfg.run.seed == 4
    cfg = trial_config(plan.trial("reproduce-synthetic-c3-N10000-s0"))
    assert cfg.data.num_instances == 10_000 and cfg.model.case == "C3" and cfg.model.temperature == 1.0
    cfg = trial_config(plan.trial("reproduce-synthetic-c3-C10000-s0"))
    assert cfg.data.num_classes == cfg.data.num_instances == 10_000
    assert {t.seed for t in plan.trials} == {0, 1, 2, 3, 4}


def test_budget_scales_steps_heavy_rows_get_more_and_names_the_sweep(tmp_path):
    one = build_reproduce_plan(storage=str(tmp_path))
    ten = build_reproduce_plan(budget=10, storage=str(tmp_path))
    steps = {t.key.replace("reproduce-synthetic-", ""): t.overrides["optim.steps"] for t in one.trials}
    assert steps["sup-default-s0"] == ARM_STEPS["supervised"] and steps["c3-default-s0"] == ARM_STEPS["diet-unit"]
    for heavy in ("sup-d20-s0", "c3-d20-s0", "c4-C10000-s0", "c3-N10000-s0"):
        light = heavy.split("-")[0] + "-default-s0"
        assert steps[heavy] > steps[light], heavy
    assert ten.name == "reproduce-synthetic-b10"
    assert ten.trial("reproduce-synthetic-b10-sup-default-s0").overrides["optim.steps"] == 10 * ARM_STEPS["supervised"]
    for t in one.trials:  # every checkpoint/warm-up setting fits its step count
        o = t.overrides
        assert o["optim.warmup_steps"] < o["optim.steps"] and o["optim.steps"] // o["run.checkpoint_every"] == 4
    assert reproduce_name(False, 1.0, 3) == "reproduce-synthetic-s3"
    assert reproduce_name(True, 0.5, 1) == "reproduce-synthetic-quick-b0.5"
    with pytest.raises(UserError, match="--budget 0"):
        build_reproduce_plan(budget=0)
    with pytest.raises(UserError, match="--seeds 0"):
        build_reproduce_plan(seeds=0)


def test_quick_grid_is_small_and_touches_every_arm_and_axis_kind(tmp_path):
    plan = build_reproduce_plan(quick=True, storage=str(tmp_path))
    assert plan.name == "reproduce-synthetic-quick" and len(plan.trials) == len(plan.groups()) == 3
    assert {t.overrides["optim.steps"] for t in plan.trials} == {QUICK_STEPS}
    assert {t.values["arm"] for t in plan.trials} == {"supervised", "diet-unit", "diet-free"}
    changed = set().union(*(changed_axes(t.values) for t in plan.trials))
    assert changed == set(AXIS_VALUES)
    cfg = trial_config(plan.trial("reproduce-synthetic-quick-c4-C10-cnormal-s0"))
    assert cfg.data.num_classes == 10 and cfg.data.conditional == "normal" and cfg.model.case == "C4"
    two = build_reproduce_plan(quick=True, seeds=2, storage=str(tmp_path))
    assert len(two.trials) == 6 and two.name == "reproduce-synthetic-quick-s2"


def test_plan_prints_every_trial_and_runs_nothing(tmp_path):
    out = run_linrep(["reproduce", "synthetic", "--plan", "--seeds", "1", "--storage", str(tmp_path / "sw")],
                     cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| reproduce-synthetic")]
    assert len(rows) == 39
    row = next(r for r in rows if "-c4-d20-s0 " in r).split(" | ")
    assert row[1:5] == ["DIET free W (C4)", "d = 20", "0", "synthetic-diet-c4"]
    assert row[5] == "data.dim=20" and int(row[6].rstrip(" |")) == 2 * 2500
    assert "39 trials" in out.stdout
    assert not (tmp_path / "sw").exists() and not (tmp_path / "mlruns").exists()
    assert plan_table(build_reproduce_plan(quick=True, storage=str(tmp_path))).count("| reproduce-synthetic") == 3


def fabricated_summary(tmp_path) -> Summary:
    """Finished trials with known figures (R² = 0.9 + setting index / 1000 + seed / 100) for a few rows of
    the paper's grid, two seeds."""
    full = build_reproduce_plan(seeds=2, storage=str(tmp_path))
    keep = ("sup-default-", "c3-default-", "sup-k5-", "c4-C10-", "c3-mlaplace-")
    trials = [t for t in full.trials if any(k in t.key for k in keep)]
    plan = dataclasses.replace(full, trials=trials)
    rows = []
    for i, t in enumerate(trials):
        base = 0.9 + (i // 2) / 1000 + t.seed / 100
        final = {"probe/r2_affine": base, "probe/r2_linear": base - 0.05, "probe/r2_w": 0.99,
                 "probe/r2_w_linear": 0.98, "probe/sv_mae": 0.02, "probe/sv_mae_w": 0.03}
        status = "failed" if t.key.endswith("sup-k5-s1") else "finished"
        rows.append(TrialRow(t, status, None, final))
    return summarise(plan, rows)


def test_paper_table_layout(tmp_path):
    table = paper_table(fabricated_summary(tmp_path))
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| setting"))
    assert header.startswith("| setting | Supervised R² z̃→z | Supervised MAE z̃→z | Supervised R² w→v | "
                             "Supervised MAE w→v | DIET unit-norm W (C3) R² z̃→z |")
    assert header.endswith("| DIET free W (C4) MAE w→v |")
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| setting")]
    assert [b[2:].split(" | ")[0] for b in body] == [
        "default (N=10^3, d=5, |C|=100, κ=10, uniform, vMF)", "|C| = 10", "κ = 5", "marginal: Laplace"]
    default = body[0].rstrip(" |").split(" | ")
    # trial order: sup default (group 0), sup k5 (1), c3 default (2), c3 mlaplace (3), c4 C10 (4)
    # supervised: affine R², no MAE (no scale predicted); C3: R² without intercept, both MAEs
    assert default[1:5] == ["0.905 ± 0.007", "–", "0.990 ± 0.000", "–"]
    assert default[5:9] == ["0.857 ± 0.007", "0.020 ± 0.000", "0.980 ± 0.000", "0.030 ± 0.000"]
    assert default[9:13] == ["–"] * 4                              # no C4 default row here
    c10 = body[1].rstrip(" |").split(" | ")
    assert c10[9] == "0.909 ± 0.007" and c10[10] == "–"           # C4: affine R², no MAE
    assert body[2].split(" | ")[1] == "0.901"                     # one seed failed: no ± for one seed
    assert "2 seeds" in table and "paper (4.1)" in table
    quick = build_reproduce_plan(quick=True, storage=str(tmp_path))
    combined = summarise(quick, [TrialRow(t, "finished", None, {"probe/r2_affine": 0.5}) for t in quick.trials])
    assert "| d = 10; κ = 5 | 0.500 |" in paper_table(combined) and "1 seed;" in paper_table(combined)


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path, shared_ray):
    """The CI grid (3 trials, one seed: every arm and every axis kind) through Ray Tune and MLflow, ending
    with the paper's table."""
    out = run_linrep(["reproduce", "synthetic", "--quick"], cwd=tmp_path, env=shared_ray, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "| setting | Supervised R² z̃→z |" in out.stdout and "DIET free W (C4) MAE w→v" in out.stdout
    sweep_dir = tmp_path / "ray_results" / "sweeps" / "reproduce-synthetic-quick"
    table = (sweep_dir / "summary" / "paper_table.md").read_text()
    rows = {line[2:].split(" | ")[0]: line.rstrip(" |").split(" | ") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| setting")}
    assert set(rows) == {"d = 10; κ = 5", "N = 10^4; marginal: Laplace", "|C| = 10; conditional: Normal"}
    sup, c3, c4 = rows["d = 10; κ = 5"], rows["N = 10^4; marginal: Laplace"], rows["|C| = 10; conditional: Normal"]
    assert 0.3 < float(sup[1]) <= 1.0 and sup[2] == "–"          # affine R²; no scale predicted
    assert 0.0 < float(c3[5]) <= 1.0 and float(c3[6]) >= 0.0 and float(c3[8]) >= 0.0   # C3: R² and both MAEs
    assert 0.0 < float(c4[9]) <= 1.0 and c4[10] == "–"           # C4: affine R², no MAE
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("synthetic").experiment_id
    parent = client.search_runs([exp], filter_string="tags.`linrep.role` = 'sweep'")[0]
    assert parent.info.run_name == "reproduce-synthetic-quick" and parent.info.status == "FINISHED"
    assert "summary/paper_table.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    c3_run = next(c for c in children if c.info.run_name.endswith("-c3-N10000-mlaplace-s0"))
    assert c3_run.data.params["model.case"] == "C3" and c3_run.data.params["data.cluster_marginal"] == "laplace"
    assert c3_run.data.metrics["probe/beta"] == 1.0
