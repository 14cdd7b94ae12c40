"""`linrep reproduce synthetic`: the paper's synthetic ablations as one sweep.

The settings and the paper's figures are described in docs/science.md, synthetic experiments.

Two arms, each a one-factor-at-a-time ablation around the paper's default setting (d=5, |C|=100,
κ=10, vMF conditional, uniform cluster vectors), like the paper's tables, not a cartesian product:

  supervised (preset synthetic-supervised): d ∈ {10, 20}, |C| ∈ {10, 1000, 10000}, κ ∈ {5, 50},
      conditional ∈ {Laplace, Normal}
  DIET (preset synthetic-diet, N=10^3, case C1 = unit-norm f and W): N = 10^5, d ∈ {10, 20},
      |C| ∈ {10, 1000}, κ ∈ {5, 50}, conditional ∈ {Laplace, Normal}, free W (case C2)
      (|C| = 10^4 is left out of DIET: it needs N >= |C| and would change two factors at once)

3 seeds each by default. Steps: 3,000 x --budget for an ordinary setting; the heavy ones run a
fraction of that (d=20 and |C|=10^4: 1/2; N=10^5: 1/10, its 10^5-way softmax costs ~40x a step)
so the whole grid fits a 2-core machine; --budget 10 on a cluster trains every setting 10x longer.
--quick is the CI preset: 5 settings x 2 seeds x 300 steps.

It runs as an ordinary sweep (tune.sweep.run_sweep: parent + child MLflow runs, resume by rerunning
the same command) and ends with the paper's table: rows = the ablated setting, columns = R² z̃->z,
R² w->v and the singular-value MAE of each arm, mean ± std over seeds. R² z̃->z is the affine R²,
or the orthogonal one (no intercept) for C1, as in the paper.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from trainer.config import ConfigError
from trainer.errors import UserError
from tune.spec import SweepPlan, Trial, sweep_root, trial_config
from tune.summary import Summary, pm

ARMS = {"supervised": "synthetic-supervised", "diet": "synthetic-diet"}
ARM_TITLES = {"supervised": "Supervised", "diet": "DIET"}
AXES = ["arm", "data.dim", "data.num_classes", "data.kappa", "data.conditional", "data.num_instances", "model.case"]
DEFAULTS = {"data.dim": 5, "data.num_classes": 100, "data.kappa": 10.0, "data.conditional": "vmf"}
DIET_DEFAULTS = {"data.num_instances": 1000, "model.case": "C1"}
BASE_STEPS = 3000
QUICK_STEPS = 300
DEFAULT_SEEDS = 3
QUICK_SEEDS = 2
PAPER_FIGURES = "paper (4.1): supervised R² z̃->z 0.998; DIET R² z̃->z 0.986 (C1) / 0.990 (C2), R² w->v 0.999, sv MAE ≈ 0.01"


@dataclass(frozen=True)
class Setting:
    """One row of the paper's table in one arm: the default, or one factor changed."""

    arm: str
    row: str                                      # the table's row label
    slug: str                                     # part of the trial keys
    changes: dict[str, Any] = field(default_factory=dict)
    cost: float = 1.0                             # fraction of the step budget (heavy settings run fewer)


ROWS_IN_ORDER = ["default", "N = 10^5", "d = 10", "d = 20", "|C| = 10", "|C| = 1000", "|C| = 10000",
                 "κ = 5", "κ = 50", "conditional: Laplace", "conditional: Normal", "free W (C2)"]


def paper_settings() -> list[Setting]:
    """Both arms' one-factor-at-a-time ablations (docs/science.md, synthetic experiments), in row order."""
    common = [
        Setting("", "d = 10", "d10", {"data.dim": 10}),
        Setting("", "d = 20", "d20", {"data.dim": 20}, cost=0.5),
        Setting("", "|C| = 10", "C10", {"data.num_classes": 10}),
        Setting("", "|C| = 1000", "C1000", {"data.num_classes": 1000}),
        Setting("", "|C| = 10000", "C10000", {"data.num_classes": 10000}, cost=0.5),
        Setting("", "κ = 5", "k5", {"data.kappa": 5.0}),
        Setting("", "κ = 50", "k50", {"data.kappa": 50.0}),
        Setting("", "conditional: Laplace", "laplace", {"data.conditional": "laplace"}),
        Setting("", "conditional: Normal", "normal", {"data.conditional": "normal"}),
    ]
    out = [Setting("supervised", "default", "default")]
    out += [_in_arm(s, "supervised") for s in common]
    out += [Setting("diet", "default", "default"),
            Setting("diet", "N = 10^5", "N100000", {"data.num_instances": 100_000}, cost=0.1)]
    out += [_in_arm(s, "diet") for s in common if s.slug != "C10000"]
    out += [Setting("diet", "free W (C2)", "C2", {"model.case": "C2"})]
    return out


def quick_settings() -> list[Setting]:
    """The CI preset: both arms' defaults, |C| and κ in the supervised arm, W free in DIET."""
    return [Setting("supervised", "default", "default"),
            Setting("supervised", "|C| = 10", "C10", {"data.num_classes": 10}),
            Setting("supervised", "κ = 50", "k50", {"data.kappa": 50.0}),
            Setting("diet", "default", "default"),
            Setting("diet", "free W (C2)", "C2", {"model.case": "C2"})]


def _in_arm(s: Setting, arm: str) -> Setting:
    return Setting(arm, s.row, s.slug, dict(s.changes), s.cost)


def setting_values(s: Setting) -> dict[str, Any]:
    """Every ablation axis of a setting (defaults filled in), for the summary's columns and plots."""
    values: dict[str, Any] = {"arm": s.arm, "setting": s.row, **DEFAULTS}
    values.update({"data.num_instances": None, "model.case": None})
    if s.arm == "diet":
        values.update(DIET_DEFAULTS)
    values.update(s.changes)
    return values


def setting_steps(s: Setting, base_steps: int, budget: float) -> int:
    return max(20, int(round(base_steps * budget * s.cost)))


def build_reproduce_plan(*, quick: bool = False, budget: float = 1.0, seeds: int | None = None,
                         storage: str | None = None) -> SweepPlan:
    """The reproduce sweep: every setting x seed as a trial, validated before Ray starts."""
    if not budget > 0:
        raise UserError(f"--budget {budget}: must be > 0 (a multiple of the default step budget)")
    seeds = seeds if seeds is not None else (QUICK_SEEDS if quick else DEFAULT_SEEDS)
    if seeds < 1:
        raise UserError(f"--seeds {seeds}: must be >= 1")
    settings = quick_settings() if quick else paper_settings()
    base_steps = QUICK_STEPS if quick else BASE_STEPS
    name = reproduce_name(quick, budget, seeds)
    trials = []
    for s in settings:
        steps = setting_steps(s, base_steps, budget)
        overrides = {**s.changes, "optim.steps": steps, "optim.warmup_steps": min(100, steps // 10),
                     "run.checkpoint_every": max(1, steps // 4), "run.log_every": max(1, min(50, steps // 10)),
                     "run.workers": 1, "run.cpus_per_worker": 1.0}
        if quick:
            overrides.update({"data.generator_pool": 1000, "probe.samples": 4096})
        for seed in range(seeds):
            key = f"{name}-{'sup' if s.arm == 'supervised' else 'diet'}-{s.slug}-s{seed}"
            trials.append(Trial(key=key, base=ARMS[s.arm], overrides={**overrides, "run.seed": seed},
                                values=setting_values(s), seed=seed, group=f"{ARM_TITLES[s.arm]}: {s.row}"))
    for t in trials:
        try:
            cfg = trial_config(t)
        except ConfigError as err:
            raise UserError(f"reproduce: setting {t.group}: {err}") from None
    root = sweep_root(storage, None, None, cfg.run.storage)
    spec_text = (f"# linrep reproduce synthetic{' --quick' if quick else ''} --budget {budget:g} --seeds {seeds}\n"
                 + "\n".join(f"{t.key}: {t.base} {t.overrides}" for t in trials) + "\n")
    return SweepPlan(name=name, trials=trials, swept=AXES, metric="probe/r2_affine", mode="max",
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


# ---- the paper's table -----------------------------------------------------------------------
def z_metric(row: dict[str, Any]) -> str:
    """Orthogonal R² (no intercept) for unit-norm features and weights (C1, C3), affine otherwise."""
    return "probe/r2_linear" if row.get("model.case") in ("C1", "C3") else "probe/r2_affine"


def paper_table(summary: Summary) -> str:
    """Rows: the ablated setting; per arm: R² z̃->z, R² w->v, sv MAE (mean ± std over seeds)."""
    arms = [a for a in ARMS if any(r.get("arm") == a for r in summary.rows)]
    by = {(r["arm"], r["setting"]): r for r in summary.rows}
    rows = [label for label in ROWS_IN_ORDER if any((a, label) in by for a in arms)]
    head = ["setting"] + [f"{ARM_TITLES[a]} {col}" for a in arms for col in ("R² z̃→z", "R² w→v", "sv MAE")]
    lines = [f"### {summary.plan.name}: identifiability, mean ± std over seeds", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for label in rows:
        cells = [label if label != "default" else "default (d=5, |C|=100, κ=10, vMF)"]
        for arm in arms:
            r = by.get((arm, label))
            if r is None:
                cells += ["–"] * 3
                continue
            cells += [_cell(r, z_metric(r)), _cell(r, "probe/r2_w"), _cell(r, "probe/sv_mae")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _footnote(summary), PAPER_FIGURES]
    return "\n".join(lines) + "\n"


def _cell(row: dict[str, Any], metric: str) -> str:
    text = pm(row.get(f"{metric}_mean", float("nan")), row.get(f"{metric}_std", float("nan")), 3)
    return text if row.get("n") else "–"


def _footnote(summary: Summary) -> str:
    seeds = sorted({t.trial.seed for t in summary.trials})
    steps = {}
    for t in summary.trials:
        steps.setdefault(t.trial.overrides["optim.steps"], set()).add(t.trial.group)
    steps_text = "; ".join(f"{n} steps: {len(g)} settings" for n, g in sorted(steps.items(), reverse=True))
    missing = sum(1 for r in summary.rows if not r["n"])
    return (f"{len(seeds)} seeds; {steps_text}; R² z̃→z is orthogonal (no intercept) for C1, affine otherwise"
            + (f"; {missing} settings without a finished seed" if missing else ""))


def reproduce_cli(args) -> int:
    """`linrep reproduce synthetic [--quick] [--budget B] [--seeds K] [--address A]`."""
    from tune.sweep import finish_message, run_sweep

    if getattr(args, "arm", "synthetic") != "synthetic":
        raise UserError(f"reproduce {args.arm}: only 'synthetic' exists")
    plan = build_reproduce_plan(quick=bool(args.quick), budget=float(args.budget), seeds=args.seeds,
                                storage=getattr(args, "storage", None))
    outcome = run_sweep(plan, address=getattr(args, "address", None),
                        extra_tables=lambda summary: {"paper_table.md": paper_table(summary)})
    print(f"\nreproduce: {outcome.counts.get('finished', 0)}/{len(plan.trials)} trials finished; "
          f"MLflow parent run {outcome.parent_run_id} (experiment '{plan.experiment}'); "
          f"tables in {plan.sweep_dir / 'summary'}", file=sys.stdout)
    return finish_message(outcome)
