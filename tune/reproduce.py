"""`linrep reproduce synthetic`: the paper's synthetic ablations as one sweep.

The settings, the figures and the public code's choices they follow are in docs/science.md
(synthetic experiments). Three arms, the runs of the public scripts (simulation/scripts/train_sup.sh
and train_selfsup.sh), each a one-factor-at-a-time ablation around the default setting (d=5, |C|=100,
κ=10, N=10^3, vMF conditional, uniform cluster vectors), like the paper's tables, not a product:

  supervised          preset synthetic-supervised
  DIET, unit-norm W   preset synthetic-diet     (Theorem 1's C3: f(x) free, rows of W unit-norm, β = 1)
  DIET, free W        preset synthetic-diet-c4  (C4: neither normalised, β = 1)

Rows (every axis of both public scripts, in every arm): N ∈ {10^3, 10^4}; d ∈ {5, 10, 20};
|C| ∈ {10, 100, 1000, 10^4}; κ ∈ {5, 10, 50}; cluster-vector marginal ∈ {uniform, Laplace, Normal}
(around e1: the public `--m-p 0/1/2`); conditional ∈ {vMF, Laplace, Normal} (`--c-p 0/1/2`).
Supervised labels are uniform over classes whatever N is, so its N row only repeats the default
(the public code's N sets its epoch length); DIET's |C| = 10^4 row also sets N = 10^4 (N >= |C|).

5 seeds (the paper's count) by default. Steps: each arm's preset steps x --budget x the row's cost;
heavy rows get more, not less (d=20, |C|=10^4 and DIET's N=10^4: 2x; not yet measured to be
enough). --quick is the CI grid: one seed, 3 short trials (one per arm, two axes changed in each) that
together touch every arm and every axis kind. --plan prints every trial (arm, row, overrides, steps) and runs nothing.

It runs as an ordinary sweep (tune.sweep.run_sweep: parent + child MLflow runs, resume by rerunning
the same command) and ends with the paper's table: rows = the ablated setting; per arm R² z̃->z,
MAE z̃->z, R² w->v and MAE w->v, mean ± std over seeds (tune.reproduce.paper_table).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from trainer.config import ConfigError
from trainer.errors import UserError
from tune.spec import SweepPlan, Trial, sweep_root, trial_config
from tune.summary import Summary, markdown_table, pm, trial_table

ARMS = {"supervised": "synthetic-supervised", "diet-unit": "synthetic-diet", "diet-free": "synthetic-diet-c4"}
ARM_TITLES = {"supervised": "Supervised", "diet-unit": "DIET unit-norm W (C3)", "diet-free": "DIET free W (C4)"}
ARM_SLUGS = {"supervised": "sup", "diet-unit": "c3", "diet-free": "c4"}
ARM_CASES = {"supervised": None, "diet-unit": "C3", "diet-free": "C4"}
AXES = ["arm", "data.num_instances", "data.dim", "data.num_classes", "data.kappa", "data.cluster_marginal",
        "data.conditional"]
DEFAULTS = {"data.num_instances": 1000, "data.dim": 5, "data.num_classes": 100, "data.kappa": 10.0,
            "data.cluster_marginal": "uniform", "data.conditional": "vmf"}
ARM_STEPS = {"supervised": 3000, "diet-unit": 2500, "diet-free": 2500}  # each arm's preset steps
QUICK_STEPS = 150
DEFAULT_SEEDS = 5
QUICK_SEEDS = 1
PAPER_FIGURES = ("paper (4.1): supervised R² z̃->z 0.998; DIET (N=10^3) R² z̃->z 0.986 (unit-norm W, C3) / "
                 "0.990 (free W, C4), R² w->v 0.999, sv MAE ≈ 0.01")


@dataclass(frozen=True)
class Setting:
    """One row of the paper's table in one arm: the default, or one factor changed."""

    arm: str
    row: str                                      # the table's row label
    slug: str                                     # part of the trial keys
    changes: dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0                             # multiple of the arm's step budget (heavy rows: more)


def paper_rows() -> list[Setting]:
    """The rows of both public scripts, arm left blank, in table order."""
    return [
        Setting("", "default", "default"),
        Setting("", "N = 10^4", "N10000", {"data.num_instances": 10_000}, cost=2.0),
        Setting("", "d = 10", "d10", {"data.dim": 10}),
        Setting("", "d = 20", "d20", {"data.dim": 20}, cost=2.0),
        Setting("", "|C| = 10", "C10", {"data.num_classes": 10}),
        Setting("", "|C| = 1000", "C1000", {"data.num_classes": 1000}),
        Setting("", "|C| = 10^4", "C10000", {"data.num_classes": 10_000, "data.num_instances": 10_000}, cost=2.0),
        Setting("", "κ = 5", "k5", {"data.kappa": 5.0}),
        Setting("", "κ = 50", "k50", {"data.kappa": 50.0}),
        Setting("", "marginal: Laplace", "mlaplace", {"data.cluster_marginal": "laplace"}),
        Setting("", "marginal: Normal", "mnormal", {"data.cluster_marginal": "normal"}),
        Setting("", "conditional: Laplace", "claplace", {"data.conditional": "laplace"}),
        Setting("", "conditional: Normal", "cnormal", {"data.conditional": "normal"}),
    ]


ROWS_IN_ORDER = [s.row for s in paper_rows()]


def paper_settings() -> list[Setting]:
    """Every row in every arm."""
    return [_in_arm(s, arm) for arm in ARMS for s in paper_rows()]


def quick_settings() -> list[Setting]:
    """The CI grid: one trial per arm, each changing two axes at once, so that three trials touch every
    arm and every axis kind (N, d, |C|, κ, marginal, conditional). A trial's cost is mostly Ray Tune's
    start-up (8 one-axis trials of 150 steps took 283 s on 2 cores), hence few trials."""
    rows = {s.slug: s for s in paper_rows()}
    picks = [("supervised", "d10", "k5"), ("diet-unit", "N10000", "mlaplace"), ("diet-free", "C10", "cnormal")]
    return [_combined(arm, rows[a], rows[b]) for arm, a, b in picks]


def _combined(arm: str, a: Setting, b: Setting) -> Setting:
    both = Setting("", f"{a.row}; {b.row}", f"{a.slug}-{b.slug}", {**a.changes, **b.changes}, max(a.cost, b.cost))
    return _in_arm(both, arm)


def _in_arm(s: Setting, arm: str) -> Setting:
    changes = dict(s.changes)
    cost = s.cost
    if arm == "supervised":
        changes.pop("data.num_instances", None)   # supervised labels are classes: N changes nothing
        if s.slug == "N10000":
            changes, cost = {"data.num_instances": 10_000}, 1.0
    return Setting(arm, s.row, s.slug, changes, cost)


def setting_values(s: Setting) -> dict[str, Any]:
    """Every ablation axis of a setting (defaults filled in), for the summary's columns and plots."""
    return {"arm": s.arm, "setting": s.row, **DEFAULTS, **s.changes, "model.case": ARM_CASES[s.arm]}


def setting_steps(s: Setting, budget: float, quick: bool) -> int:
    base = QUICK_STEPS if quick else ARM_STEPS[s.arm]
    return max(20, int(round(base * budget * (1.0 if quick else s.cost))))


def trial_overrides(s: Setting, steps: int, quick: bool) -> dict[str, Any]:
    overrides = {**s.changes, "optim.steps": steps, "optim.warmup_steps": min(100, steps // 10),
                 "run.checkpoint_every": max(1, steps // (2 if quick else 4)),
                 "run.log_every": max(1, min(50, steps // 10)), "run.workers": 1, "run.cpus_per_worker": 1.0}
    if quick:
        overrides.update({"data.generator_pool": 1000, "probe.samples": 4096})
    return overrides


def build_reproduce_plan(*, quick: bool = False, budget: float = 1.0, seeds: int | None = None,
                         storage: str | None = None) -> SweepPlan:
    """The reproduce sweep: every setting x seed as a trial, validated before Ray starts."""
    if not budget > 0:
        raise UserError(f"--budget {budget}: must be > 0 (a multiple of the default step budget)")
    seeds = seeds if seeds is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS)
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be >= 1")
    name = reproduce_name(quick, budget, seeds)
    trials = []
    for s in (quick_settings() if quick else paper_settings()):
        overrides = trial_overrides(s, setting_steps(s, budget, quick), quick)
        for seed in range(seeds):
            trials.append(Trial(key=f"{name}-{ARM_SLUGS[s.arm]}-{s.slug}-s{seed}", base=ARMS[s.arm],
                                overrides={**overrides, "run.seed": seed}, values=setting_values(s), seed=seed,
                                group=f"{ARM_TITLES[s.arm]}: {s.row}"))
    for t in trials:
        try:
            cfg = trial_config(t)
        except ConfigError as err:
            raise UserError(f"reproduce: setting {t.group}: {err}") from None
    root = sweep_root(storage, None, None, cfg.run.storage)
    spec_text = (f"# linrep reproduce synthetic{' --quick' if quick else ''} --budget {budget:g} --seeds {seeds}\n"
                 + "\n".join(f"{t.key}: {t.base} {t.overrides}" for t in trials) + "\n")
    return SweepPlan(name=name, trials=trials, swept=AXES + ["model.case"], metric="probe/r2_affine", mode="max",
                     resources={"workers": 1, "cpus_per_worker": 1.0, "use_gpu": False}, max_concurrent=None,
                     experiment=cfg.experiment_name, storage=str(root), spec_text=spec_text, kind="reproduce")


def reproduce_name(quick: bool, budget: float, seeds: int) -> str:
    """Distinct arguments, distinct sweeps (each resumable by rerunning the same command)."""
    name = "reproduce-synthetic" + ("-quick" if quick else "")
    if budget != 1.0:
        name += f"-b{budget:g}"
    if seeds != (QUICK_SEEDS if quick else DEFAULT_SEEDS):
        name += f"-s{seeds}"
    return name


PLAN_FIXED = {"optim.steps", "run.seed", "optim.warmup_steps", "run.checkpoint_every", "run.log_every",
              "run.workers", "run.cpus_per_worker", "data.generator_pool", "probe.samples"}


def plan_table(plan: SweepPlan) -> str:
    """`--plan`: one line per trial (arm, row, seed, preset, the row's overrides, steps); runs nothing."""
    lines = [f"### {plan.name}: {len(plan.trials)} trials, {sum(t.overrides['optim.steps'] for t in plan.trials):,} "
             "steps in all", ""]
    lines += trial_table(plan, ["trial", "arm", "row", "seed", "preset"],
                         lambda t: [t.key, ARM_TITLES[t.values["arm"]], t.values["setting"], str(t.seed), t.base],
                         PLAN_FIXED)
    return "\n".join(lines) + "\n"


# ---- the paper's table -----------------------------------------------------------------------
COLUMNS = [("R² z̃→z", "z_r2"), ("MAE z̃→z", "probe/sv_mae"), ("R² w→v", "w_r2"), ("MAE w→v", "probe/sv_mae_w")]


def column_metric(row: dict[str, Any], column: str) -> str | None:
    """The figure behind a column for this row's case (None: the case predicts no scale, shown '–').

    As the public code: unit-norm W (C3) is scored without intercept, against the predicted scale;
    free W (C4) and supervised by the affine R², with no singular-value figure."""
    orthogonal = row.get("model.case") in ("C1", "C2", "C3")
    if column == "z_r2":
        return "probe/r2_linear" if orthogonal else "probe/r2_affine"
    if column == "w_r2":
        return "probe/r2_w_linear" if row.get("model.case") in ("C1", "C3") else "probe/r2_w"
    return column if orthogonal else None


def paper_table(summary: Summary) -> str:
    """Rows: the ablated setting; per arm: R² and MAE of z̃->z and of w->v (mean ± std over seeds)."""
    arms = [a for a in ARMS if any(r.get("arm") == a for r in summary.rows)]
    by = {(r["arm"], r["setting"]): r for r in summary.rows}
    labels = ROWS_IN_ORDER + [r["setting"] for r in summary.rows if r["setting"] not in ROWS_IN_ORDER]
    rows = [label for label in dict.fromkeys(labels) if any((a, label) in by for a in arms)]
    head = ["setting"] + [f"{ARM_TITLES[a]} {title}" for a in arms for title, _ in COLUMNS]

    def cells(label: str) -> list[str]:
        out = [label if label != "default" else "default (N=10^3, d=5, |C|=100, κ=10, uniform, vMF)"]
        for arm in arms:
            r = by.get((arm, label))
            out += [_cell(r, column_metric(r, col)) if r else "–" for _, col in COLUMNS]
        return out

    lines = [f"### {summary.plan.name}: identifiability, mean ± std over seeds", "",
             *markdown_table(head, [cells(label) for label in rows]), "", _footnote(summary), PAPER_FIGURES]
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any], metric: str | None) -> str:
    if metric is None or not row.get("n"):
        return "–"
    return pm(row.get(f"{metric}_mean", float("nan")), row.get(f"{metric}_std", float("nan")), 3)


def _footnote(summary: Summary) -> str:
    seeds = sorted({t.trial.seed for t in summary.trials})
    steps = {}
    for t in summary.trials:
        steps.setdefault(t.trial.overrides["optim.steps"], set()).add(t.trial.group)
    steps_text = "; ".join(f"{n} steps: {len(g)} settings" for n, g in sorted(steps.items(), reverse=True))
    missing = sum(1 for r in summary.rows if not r["n"])
    return (f"{len(seeds)} seed{'' if len(seeds) == 1 else 's'}; {steps_text}; R² is without intercept and MAE is against the predicted scale "
            "(z̃->z: β/κ, w->v: 1) for unit-norm W (C3); affine R² and no MAE for free W (C4) and supervised"
            + (f"; {missing} settings without a finished seed" if missing else ""))


def reproduce_cli(args) -> int:
    """`linrep reproduce synthetic [--quick] [--budget B] [--seeds K] [--plan] [--address A]`."""
    if getattr(args, "arm", "synthetic") != "synthetic":
        raise UserError(f"reproduce {args.arm}: only 'synthetic' exists")
    plan = build_reproduce_plan(quick=bool(args.quick), budget=float(args.budget), seeds=args.seeds,
                                storage=getattr(args, "storage", None))
    if getattr(args, "plan", False):
        print(plan_table(plan), end="", file=sys.stdout)
        return 0
    from tune.sweep import finish_message, run_sweep

    outcome = run_sweep(plan, address=getattr(args, "address", None),
                        extra_tables=lambda summary: {"paper_table.md": paper_table(summary)})
    print(f"\nreproduce: {outcome.counts.get('finished', 0)}/{len(plan.trials)} trials finished; "
          f"MLflow parent run {outcome.parent_run_id} (experiment '{plan.experiment}'); "
          f"tables in {plan.sweep_dir / 'summary'}", file=sys.stdout)
    return finish_message(outcome)
