"""The probe's figure: accuracy per ImageNet-X target and model, against chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from probes.imagenetx.annotations import TARGETS
from probes.imagenetx.statistics import CHANCE
from trainer.files import write_with_atomic


def plot_factor_accuracies(table: pd.DataFrame, path: Path, error: str = "sem",
                           title: str = "ImageNet-X factors decoded linearly from features") -> Path:
    """Grouped bars (one group per target, one bar per model, SEM error bars by default, as the
    public plotting.py), dashed chance line, '*' over significant bars; written atomically as PNG."""
    from probes.imagenetx.tables import error_column

    column = error_column(error)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    targets = [t for t in TARGETS if t in set(table["target"])] + \
        [t for t in dict.fromkeys(table["target"]) if t not in TARGETS]
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(targets) * max(1, len(models)) ** 0.5), 4.2))
    for j, model in enumerate(models):
        rows = table[table["model"] == model].set_index("target").reindex(targets)
        x = np.arange(len(targets)) + (j - (len(models) - 1) / 2) * width
        means, stds = rows["acc_mean"].to_numpy(float), rows[column].to_numpy(float)
        ax.bar(x, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), label=model, capsize=1.5)
        for xi, m, s, sig in zip(x, means, stds, rows["significant"].fillna(False).to_numpy(bool)):
            if sig and np.isfinite(m):
                ax.text(xi, m + np.nan_to_num(s) + 0.01, "*", ha="center", va="bottom", fontsize=9)
    ax.axhline(CHANCE, color="k", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(np.arange(len(targets)))
    ax.set_xticklabels([t.replace("_", " ") for t in targets], rotation=45, ha="right")
    ax.set_ylabel(f"balanced probe accuracy (± {error.upper() if error == 'sem' else error})")
    ax.set_ylim(0.3, 1.05)
    ax.legend(fontsize=8, ncol=min(len(models) + 1, 4), loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    try:
        write_with_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
