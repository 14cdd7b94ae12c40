"""`linrep reproduce synthetic`: the paper's one-factor-at-a-time grids, the step budget, the
table in the paper's layout, and (slow) the --quick preset end to end under 15 minutes."""

from __future__ import annotations

import math
import time

import pytest

from tests.conftest import run_linrep
from trainer.errors import UserError
from tune.reproduce import (BASE_STEPS, DEFAULTS, DIET_DEFAULTS, QUICK_STEPS, build_reproduce_plan, paper_table,
                            reproduce_name)
from tune.spec import trial_config
from tune.summary import Summary, TrialRow, summarise


def changed_axes(values: dict) -> set[str]:
    defaults = {**DEFAULTS, **(DIET_DEFAULTS if values["arm"] == "diet" else {})}
    return {k for k, v in defaults.items() if values.get(k) != v}


def test_paper_grid_is_one_factor_at_a_time_around_the_default(tmp_path):
    plan = build_reproduce_plan(storage=str(tmp_path))
    assert plan.name == "reproduce-synthetic" and plan.kind == "reproduce"
    groups = plan.groups()
    sup = [g for g in groups if g.startswith("Supervised")]
    diet = [g for g in groups if g.startswith("DIET")]
    assert len(sup) == 10 and len(diet) == 11 and len(plan.trials) == 21 * 3
    for t in plan.trials:
        changed = changed_axes(t.values)
        assert len(changed) == (0 if t.values["setting"] == "default" else 1), (t.key, changed)
    settings = {(t.values["arm"], t.values["setting"]) for t in plan.trials}
    for axis_rows in (["d = 10", "d = 20"], ["|C| = 10", "|C| = 1000"], ["κ = 5", "κ = 50"],
                      ["conditional: Laplace", "conditional: Normal"]):
        for row in axis_rows:
            assert ("supervised", row) in settings and ("diet", row) in settings
    assert ("supervised", "|C| = 10000") in settings and ("diet", "N = 10^5") in settings
    assert ("diet", "free W (C2)") in settings
    cfg = trial_config(plan.trial("reproduce-synthetic-diet-C2-s2"))
    assert cfg.model.case == "C2" and cfg.data.labels == "instance" and cfg.run.seed == 2
    cfg = trial_config(plan.trial("reproduce-synthetic-diet-N100000-s0"))
    assert cfg.data.num_instances == 100_000 and cfg.model.case == "C1"
    assert {t.seed for t in plan.trials} == {0, 1, 2}


def test_budget_scales_steps_and_names_the_sweep(tmp_path):
    one = build_reproduce_plan(storage=str(tmp_path))
    ten = build_reproduce_plan(budget=10, storage=str(tmp_path))
    steps = {t.key.replace("reproduce-synthetic-", ""): t.overrides["optim.steps"] for t in one.trials}
    assert steps["sup-default-s0"] == BASE_STEPS and steps["sup-d20-s0"] == BASE_STEPS // 2
    assert steps["diet-N100000-s0"] == BASE_STEPS // 10
    assert ten.name == "reproduce-synthetic-b10"
    assert ten.trial("reproduce-synthetic-b10-sup-default-s0").overrides["optim.steps"] == 10 * BASE_STEPS
    for t in one.trials:  # every checkpoint/warm-up setting fits its step count
        o = t.overrides
        assert o["optim.warmup_steps"] < o["optim.steps"] and o["optim.steps"] // o["run.checkpoint_every"] == 4
    assert reproduce_name(False, 1.0, 5) == "reproduce-synthetic-s5"
    assert reproduce_name(True, 0.5, 2) == "reproduce-synthetic-quick-b0.5"
    with pytest.raises(UserError, match="--budget 0"):
        build_reproduce_plan(budget=0)
    with pytest.raises(UserError, match="--seeds 0"):
        build_reproduce_plan(seeds=0)


def test_quick_preset_is_small(tmp_path):
    plan = build_reproduce_plan(quick=True, storage=str(tmp_path))
    assert plan.name == "reproduce-synthetic-quick" and len(plan.trials) == 10 and len(plan.groups()) == 5
    assert {t.overrides["optim.steps"] for t in plan.trials} == {QUICK_STEPS}
    assert {t.values["arm"] for t in plan.trials} == {"supervised", "diet"}
    one_seed = build_reproduce_plan(quick=True, seeds=1, storage=str(tmp_path))
    assert len(one_seed.trials) == 5 and one_seed.name == "reproduce-synthetic-quick-s1"


def fabricated_summary(tmp_path) -> Summary:
    """Finished trials with known figures: R² = 0.9 + setting index / 1000 + seed / 100."""
    plan = build_reproduce_plan(quick=True, storage=str(tmp_path))
    rows = []
    for i, t in enumerate(plan.trials):
        base = 0.9 + (i // 2) / 1000 + t.seed / 100
        final = {"probe/r2_affine": base, "probe/r2_linear": base - 0.05, "probe/r2_w": 0.99, "probe/sv_mae": 0.02}
        status = "failed" if t.key.endswith("sup-k50-s1") else "finished"
        rows.append(TrialRow(t, status, None, final))
    return summarise(plan, rows)


def test_paper_table_layout(tmp_path):
    table = paper_table(fabricated_summary(tmp_path))
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| setting"))
    assert header == ("| setting | Supervised R² z̃→z | Supervised R² w→v | Supervised sv MAE | "
                      "DIET R² z̃→z | DIET R² w→v | DIET sv MAE |")
    body = [line for line in lines if line.startswith("| ") and not line.startswith("| setting")]
    assert [b.split(" | ")[0] for b in body] == ["| default (d=5, |C|=100, κ=10, vMF)", "| |C| = 10", "| κ = 50",
                                                 "| free W (C2)"]
    default = body[0].split(" | ")
    # supervised: affine R², seeds 0 and 1 -> 0.905 ± 0.007; DIET C1: orthogonal (r2_linear) R²
    assert default[1] == "0.905 ± 0.007" and default[4] == "0.858 ± 0.007"
    assert body[3].split(" | ")[1:4] == ["–", "–", "–"]          # free W exists only in DIET
    assert body[3].split(" | ")[4] == "0.909 ± 0.007"             # C2: affine R²
    assert body[2].split(" | ")[1] == "0.902"                     # one seed failed: no ± for one seed
    assert "2 seeds" in table and "300 steps: 5 settings" in table and "paper (4.1)" in table


@pytest.mark.slow
def test_reproduce_quick_end_to_end_under_15_minutes(tmp_path):
    t0 = time.time()
    out = run_linrep(["reproduce", "synthetic", "--quick"], cwd=tmp_path, timeout=1200)
    wall = time.time() - t0
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert wall < 15 * 60, wall
    assert "| setting | Supervised R² z̃→z |" in out.stdout and "| free W (C2) | – | – | – |" in out.stdout
    sweep_dir = tmp_path / "ray_results" / "sweeps" / "reproduce-synthetic-quick"
    table = (sweep_dir / "summary" / "paper_table.md").read_text()
    cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| default")]
    r2 = float(cells[0][1].split(" ± ")[0])
    assert 0.3 < r2 <= 1.0 and not math.isnan(r2)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("synthetic").experiment_id
    parent = client.search_runs([exp], filter_string="tags.`linrep.role` = 'sweep'")[0]
    assert parent.info.run_name == "reproduce-synthetic-quick" and parent.info.status == "FINISHED"
    assert "summary/paper_table.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 10 and {c.info.status for c in children} == {"FINISHED"}
