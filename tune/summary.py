"""A sweep's summary: per configuration, mean ± std over seeds of the final probe figures.

The trials are read back from MLflow (the parent run's child runs: final metrics and the metric
history of the learning curves) joined with the plan (which configuration and seed each is) and
the trial ledgers (finished, stopped early by the scheduler, failed). Outputs, written atomically
under <sweep folder>/summary/ and logged as artifacts of the parent run:

  summary/summary.csv     one row per configuration: swept values, n, <figure>_mean, <figure>_std
  summary/summary.md      the same as a markdown table (also printed on the console)
  plots/r2_vs_<key>.png   the ranking metric against each swept numeric key (|C| on a log axis,
                          κ, β, ...), one line per combination of the other swept keys
  plots/learning_curves.png   the ranking metric against the step, per configuration

The parent run also names its best child run (the best configuration's best seed): tag
linrep.best_child_run_id, and a description (mlflow.note.content) and summary/best_child.md
with a link to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer import tracking
from trainer.files import write_text_atomic, write_with_atomic
from tune.folder import TrialLedger
from tune.spec import SweepPlan, Trial

SKIP_FIGURES = {"probe/seconds"}
EXTRA_FIGURES = ["train/acc"]
LOG_AXES = {"data.num_classes", "data.num_instances", "model.temperature", "optim.lr", "optim.steps"}
AXIS_NAMES = {"data.num_classes": "number of classes |C|", "data.kappa": "concentration κ",
              "model.temperature": "head temperature β", "data.dim": "dimension d",
              "data.num_instances": "instance labels N"}
PLOT_FILES = {"data.num_classes": "r2_vs_num_classes.png", "data.kappa": "r2_vs_kappa.png",
              "model.temperature": "r2_vs_beta.png"}


@dataclass
class TrialRow:
    trial: Trial
    status: str                       # finished | stopped | failed | running | pending
    run_id: str | None
    final: dict[str, float]
    history: list[tuple[int, float]] = field(default_factory=list)   # (step, ranking metric)


@dataclass
class Summary:
    """Per-configuration statistics, in plan order."""

    plan: SweepPlan
    figures: list[str]                            # metric names summarised
    rows: list[dict[str, Any]]                    # one per configuration
    trials: list[TrialRow]

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def best(self) -> dict[str, Any] | None:
        key = f"{self.plan.metric}_mean"
        scored = [r for r in self.rows if isinstance(r.get(key), float) and not math.isnan(r[key])]
        if not scored:
            return None
        return (max if self.plan.mode == "max" else min)(scored, key=lambda r: r[key])


# ---- collecting ------------------------------------------------------------------------------
def collect_trials(plan: SweepPlan, uri: str, parent_run_id: str, *, with_history: bool = True) -> list[TrialRow]:
    """Every planned trial with its status, final figures and learning curve."""
    exp_id = tracking.ensure_experiment(uri, plan.experiment)
    children = {c.key: c for c in tracking.child_runs(uri, exp_id, parent_run_id)}
    rows = []
    for trial in plan.trials:
        ledger = TrialLedger(plan.sweep_dir, trial.key).read()
        child = children.get(trial.key)
        status = ledger.get("status") or ("pending" if child is None else "running")
        final = dict(child.metrics) if child else dict(ledger.get("final", {}))
        history = []
        if with_history and child is not None and plan.metric in final:
            history = tracking.metric_history(uri, child.run_id, plan.metric)
        rows.append(TrialRow(trial, status, child.run_id if child else None, final, history))
    return rows


def figure_names(rows: list[TrialRow], metric: str) -> list[str]:
    """The figures to summarise: the probe's in its order, then other probe figures, then train/acc."""
    from probes.actor import FIGURE_ORDER  # here, not at the top: probes.actor brings torch

    seen = {k for r in rows for k in r.final}
    probes = [k for k in FIGURE_ORDER if k in seen]
    probes += sorted(k for k in seen if k.startswith("probe/") and k not in FIGURE_ORDER and k not in SKIP_FIGURES)
    extra = [k for k in EXTRA_FIGURES if k in seen]
    if metric in seen and metric not in probes + extra:
        extra.insert(0, metric)
    return probes + extra


def summarise(plan: SweepPlan, trials: list[TrialRow]) -> Summary:
    """Mean ± std (sample std, ddof=1; nan for one seed) over the finished seeds of each configuration."""
    figures = figure_names([t for t in trials if t.status == "finished"], plan.metric)
    rows = []
    for group in plan.groups():
        members = [t for t in trials if t.trial.group == group]
        done = [t for t in members if t.status == "finished"]
        row: dict[str, Any] = {"configuration": group, **members[0].trial.values,
                               "n": len(done), "stopped": sum(t.status == "stopped" for t in members),
                               "failed": sum(t.status == "failed" for t in members)}
        for fig in figures:
            vals = [t.final[fig] for t in done if fig in t.final]
            row[f"{fig}_mean"], row[f"{fig}_std"] = mean_std(vals)
        rows.append(row)
    return Summary(plan, figures, rows, trials)


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


# ---- rendering -------------------------------------------------------------------------------
def pm(mean: float, std: float, digits: int = 4) -> str:
    """'0.9851 ± 0.0040' ('–' when missing; no ± for a single seed)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table's lines: the header, its rule, one line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|",
            *("| " + " | ".join(str(c) for c in cells) + " |" for cells in rows)]


def trial_table(plan: SweepPlan, head: list[str], cells: Callable[[Trial], list[str]], fixed: set[str]) -> list[str]:
    """`--plan` of a reproduce sweep: one line per trial; `cells` gives the columns before the
    overrides (those outside `fixed`) and the steps, which close every line."""
    def changes(t: Trial) -> str:
        return " ".join(f"{k}={v}" for k, v in t.overrides.items() if k not in fixed) or "(none)"

    return markdown_table([*head, "overrides", "steps"],
                          [[*cells(t), changes(t), str(t.overrides["optim.steps"])] for t in plan.trials])


def to_markdown(summary: Summary) -> str:
    figs = summary.figures
    head = ["configuration", "n"] + [f.split("/", 1)[-1] for f in figs]

    def cells(row: dict[str, Any]) -> list[Any]:
        n = f"{row['n']}" + (f" (+{row['stopped']} stopped)" if row["stopped"] else "") + (
            f" (+{row['failed']} failed)" if row["failed"] else "")
        return [row["configuration"], n] + [pm(row[f"{f}_mean"], row[f"{f}_std"]) for f in figs]

    lines = markdown_table(head, [cells(row) for row in summary.rows])
    best = summary.best()
    if best:
        lines.append("")
        lines.append(f"best by {summary.plan.metric} ({summary.plan.mode}): {best['configuration']} "
                     f"({pm(best[summary.plan.metric + '_mean'], best[summary.plan.metric + '_std'])})")
    return "\n".join(lines) + "\n"


def to_csv(summary: Summary) -> str:
    return summary.frame().to_csv(index=False)


# ---- plots -----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def numeric_axes(summary: Summary) -> list[str]:
    """Swept keys with numeric values and at least two distinct values."""
    out = []
    for key in summary.plan.swept:
        vals = {r.get(key) for r in summary.rows if r.get(key) is not None}
        if len(vals) >= 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out.append(key)
    return out


def plot_against(summary: Summary, key: str, path: Path) -> bool:
    """The ranking metric (mean ± std over seeds) against `key`, a line per setting of the other keys."""
    metric = summary.plan.metric
    others = [k for k in summary.plan.swept if k != key]
    series: dict[tuple, list[tuple[float, float, float]]] = {}
    for row in summary.rows:
        x, m, s = row.get(key), row.get(f"{metric}_mean"), row.get(f"{metric}_std")
        if x is None or m is None or (isinstance(m, float) and math.isnan(m)):
            continue
        label = tuple((k, row.get(k)) for k in others)
        series.setdefault(label, []).append((float(x), m, 0.0 if s is None or math.isnan(s) else s))
    series = {k: sorted(v) for k, v in series.items() if len({p[0] for p in v}) >= 2}
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, points in series.items():
        xs, ms, ss = zip(*points)
        name = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in label if v is not None) or metric
        ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=name)
    xs_all = [p[0] for v in series.values() for p in v]
    if key in LOG_AXES or (min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 20):
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ax.set_xscale("log")
        ax.set_xticks(sorted(set(xs_all)))  # label the swept values themselves, not powers of ten
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(AXIS_NAMES.get(key, key))
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"{summary.plan.name}: {metric.split('/', 1)[-1]} against {AXIS_NAMES.get(key, key)}")
    ax.grid(alpha=0.3)
    if len(series) > 1 or series.keys() != {()}:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_learning_curves(summary: Summary, path: Path) -> bool:
    """The ranking metric against the step: mean over seeds per configuration (band: ± std)."""
    metric = summary.plan.metric
    curves = {}
    for group in summary.plan.groups():
        by_step: dict[int, list[float]] = {}
        for t in summary.trials:
            if t.trial.group == group:
                for step, value in t.history:
                    by_step.setdefault(step, []).append(value)
        if by_step:
            steps = sorted(by_step)
            stats = [mean_std(by_step[s]) for s in steps]
            curves[group] = (steps, [m for m, _ in stats], [0.0 if math.isnan(s) else s for _, s in stats])
    if not curves:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for group, (steps, means, stds) in curves.items():
        line, = ax.plot(steps, means, marker=".", label=group)
        ax.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{summary.plan.name}: learning curves of {metric.split('/', 1)[-1]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2 if len(curves) > 8 else 1)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _save(fig, path: Path) -> None:
    write_with_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def write_outputs(summary: Summary, out_dir: Path, extra_tables: dict[str, str] | None = None) -> list[Path]:
    """summary.csv, summary.md (+ extra markdown tables) and the plots, under out_dir."""
    paths = []
    for name, text in {"summary.csv": to_csv(summary), "summary.md": to_markdown(summary),
                       **(extra_tables or {})}.items():
        write_text_atomic(out_dir / "summary" / name, text)
        paths.append(out_dir / "summary" / name)
    for key in numeric_axes(summary):
        name = PLOT_FILES.get(key, f"r2_vs_{key.rsplit('.', 1)[-1]}.png")
        if plot_against(summary, key, out_dir / "plots" / name):
            paths.append(out_dir / "plots" / name)
    if plot_learning_curves(summary, out_dir / "plots" / "learning_curves.png"):
        paths.append(out_dir / "plots" / "learning_curves.png")
    return paths


# ---- the best child, linked from the parent run ----------------------------------------------
BEST_CHILD_TAG = "linrep.best_child_run_id"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)


def best_trial(summary: Summary) -> TrialRow | None:
    """The finished trial of the best configuration whose own ranking figure is best (ties: the
    first in plan order): the run a user opens from the sweep."""
    best = summary.best()
    metric = summary.plan.metric
    if not best:
        return None
    members = [t for t in summary.trials if t.trial.group == best["configuration"] and t.status == "finished"
               and t.run_id and isinstance(t.final.get(metric), float) and not math.isnan(t.final[metric])]
    if not members:
        return None
    pick = max if summary.plan.mode == "max" else min
    return pick(members, key=lambda t: t.final[metric])


def best_child_note(summary: Summary, child: TrialRow, experiment_id: str) -> str:
    """The parent run's description: a markdown link to the best child run, with its figure."""
    metric = summary.plan.metric
    href = f"#/experiments/{experiment_id}/runs/{child.run_id}"
    return (f"**Best child run** by {metric} ({summary.plan.mode}): [{child.trial.key}]({href}), "
            f"configuration `{child.trial.group}`, {metric} = {child.final[metric]:.4f} "
            f"(run id `{child.run_id}`).\n\nThe summary table is under `summary/`, the plots under `plots/`.\n")


def link_best_child(summary: Summary, uri: str, parent_run_id: str) -> TrialRow | None:
    """Tag the parent run with the best child's run id and describe it with a link to that run."""
    child = best_trial(summary)
    if child is None:
        return None
    exp_id = tracking.ensure_experiment(uri, summary.plan.experiment)
    note = best_child_note(summary, child, exp_id)
    tracking.set_tags(uri, parent_run_id, {BEST_CHILD_TAG: child.run_id, "linrep.best_child_run_name": child.trial.key,
                                           NOTE_TAG: note})
    tracking.log_text(uri, parent_run_id, note, "summary/best_child.md")
    return child


def publish_summary(plan: SweepPlan, uri: str, parent_run_id: str, *, out: Callable[[str], None] = print,
                    extra_tables: Callable[[Summary], dict[str, str]] | None = None) -> tuple[Summary, list]:
    """Collect, summarise, write (into the sweep folder, local or a URI), log to the parent run and
    print the summary of a sweep. Returns the summary and the files written (Paths when local)."""
    trials = collect_trials(plan, uri, parent_run_id)
    summary = summarise(plan, trials)
    extra = extra_tables(summary) if extra_tables else {}
    folder = plan.sweep_dir
    with folder.staged_writes() as staging:  # a sweep folder on s3:// gets the files on exit
        paths = write_outputs(summary, staging, extra)
        for path in paths:
            tracking.log_artifact(uri, parent_run_id, path, path.parent.name)
    if not folder.is_local:
        paths = [folder / path.relative_to(staging).as_posix() for path in paths]
    best = summary.best()
    link_best_child(summary, uri, parent_run_id)
    if best:
        tracking.set_tags(uri, parent_run_id, {"linrep.best_configuration": best["configuration"]})
        tracking.log_metrics(uri, parent_run_id, {
            f"best/{f}": best[f"{f}_mean"] for f in summary.figures
            if isinstance(best.get(f"{f}_mean"), float) and not math.isnan(best[f"{f}_mean"])})
    out("\n" + to_markdown(summary))
    for name, text in extra.items():
        if name.endswith(".md"):  # markdown tables to the console; other files (CSV) only to disk and MLflow
            out(text)
    return summary, paths
