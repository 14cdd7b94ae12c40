"""The probe's tables: the long table as CSV, the targets x models summary as markdown, and the
MLflow metric names of a table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from probes.imagenetx.annotations import TARGETS
from probes.imagenetx.statistics import ALPHA
from trainer.errors import UserError
from trainer.files import write_text_atomic

METRIC_PREFIX = "probe/imagenetx"


ERRORS = {"sem": "acc_sem", "std": "acc_std"}  # error-bar name -> column (SEM: the public plotting.py)


def error_column(error: str) -> str:
    if error not in ERRORS:
        raise UserError(f"ImageNet-X probe: error bars '{error}', choose {' or '.join(ERRORS)}")
    return ERRORS[error]


def wide_table(table: pd.DataFrame, error: str = "sem") -> pd.DataFrame:
    """Targets x models: 'acc ± SEM' (or ± std) with '*' where significant (the markdown summary)."""
    column = error_column(error)

    def cell(r) -> str:
        if pd.isna(r.get("acc_mean")):
            return "n/a"
        return f"{r['acc_mean']:.3f} ± {r[column]:.3f}" + ("*" if r["significant"] else "")

    cells = table.assign(cell=table.apply(cell, axis=1))
    wide = cells.pivot(index="target", columns="model", values="cell")
    order = [t for t in TARGETS if t in wide.index] + [t for t in wide.index if t not in TARGETS]
    models = list(dict.fromkeys(table["model"]))
    return wide.loc[order, models]


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional `tabulate`)."""
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in frame.iterrows():
        lines.append("| " + " | ".join([str(idx)] + [str(v) for v in row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def caption(table: pd.DataFrame, alpha: float = ALPHA, error: str = "sem", alternative: str = "two-sided",
            bonferroni: str = "targets x models") -> str:
    """The markdown table's first line: what the numbers, the error and the star mean."""
    tests = int(table["tests"].iloc[0]) if len(table) else 0
    error_text = "SEM = std (ddof=0) / sqrt(seeds)" if error == "sem" else "std (ddof=1)"
    test_text = "differs from 0.5 by a two-sided" if alternative == "two-sided" else "is above 0.5 by a one-sided"
    return (f"Balanced logistic-probe accuracy (mean ± {error_text} over seeds); * = {test_text} one-sample "
            f"t-test at alpha {alpha} / {tests} (Bonferroni over {bonferroni}).")


def write_tables(table: pd.DataFrame, out_dir: Path, alpha: float = ALPHA, *, error: str = "sem",
                 alternative: str = "two-sided", footnote: str = "", bonferroni: str = "targets x models",
                 stem: str = "imagenetx_probe") -> tuple[Path, Path]:
    """<stem>.csv (long) and <stem>.md (wide, the test and correction stated, + footnote), atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    write_text_atomic(csv_path, table.to_csv(index=False))
    text = (caption(table, alpha, error, alternative, bonferroni) + "\n\n" + to_markdown(wide_table(table, error))
            + (f"\n{footnote}\n" if footnote else ""))
    write_text_atomic(md_path, text)
    return csv_path, md_path


def metrics_of(table: pd.DataFrame, found: dict[str, int] | None = None) -> dict[str, float]:
    """{'probe/imagenetx/<model>/<target>': mean accuracy, '.../<target>_auc': mean ROC-AUC, ...}."""
    metrics = {}
    for r in table.itertuples():
        if pd.notna(r.acc_mean):
            metrics[f"{METRIC_PREFIX}/{r.model}/{r.target}"] = float(r.acc_mean)
            metrics[f"{METRIC_PREFIX}/{r.model}/{r.target}_auc"] = float(r.auc_mean)
    for model, count in (found or {}).items():
        metrics[f"{METRIC_PREFIX}/{model}/found_images"] = float(count)
    return metrics

