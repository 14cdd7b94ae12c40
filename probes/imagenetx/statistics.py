"""The probe's statistics: balanced logistic probes per (target, seed), test accuracy and ROC-AUC,
a one-sample t-test against chance, SEM over seeds, and Bonferroni over (target, model) pairs.

Defaults follow the paper's public code (klindtlab/csi, imagenetx/decode.py and plotting.py; see
docs/science.md, ImageNet-X): units whose mean activation is <= 0 are dropped, the t-test is
two-sided, error bars are the SEM (numpy's std, ddof=0, over sqrt(seeds)).

All (target, seed) logistic fits of one feature matrix run as one batched problem (``probes.logistic``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from probes.imagenetx.annotations import TARGETS
from probes.logistic import (
    balanced_stratified_split,
    decision_function_batched,
    fit_logistic_batched,
    standardize_stats,
    weights_from_index,
)
from trainer.errors import UserError

CHANCE = 0.5
ALPHA = 0.05


ALTERNATIVES = ("two-sided", "greater")
UNIT_RULES = ("nonpositive-mean", "constant")


def drop_inactive_units(X: np.ndarray, rule: str = "nonpositive-mean") -> tuple[np.ndarray, int]:
    """Drop the units the rule names; returns (kept columns, number dropped).

    ``nonpositive-mean`` (the public decode.py: ``outputs.mean(0) > 0`` kept): drops dead ReLU
    units and, for features without a ReLU (a pixel projection, a ViT token), the units whose mean
    is <= 0 too. ``constant``: only units that never vary (they cannot be z-scored). Both rules also
    drop constant units, which z-scoring would turn into NaNs."""
    if rule not in UNIT_RULES:
        raise UserError(f"ImageNet-X probe: unit rule '{rule}', choose {' or '.join(UNIT_RULES)}")
    X = np.asarray(X)
    varies = X.max(0) - X.min(0) > 1e-8 * np.maximum(1.0, np.abs(X).max(0))
    keep = varies & (X.mean(0, dtype=np.float64) > 0) if rule == "nonpositive-mean" else varies
    return X[:, keep], int((~keep).sum())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    from scipy.stats import rankdata

    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def t_test_vs_chance(values: Sequence[float], chance: float = CHANCE,
                     alternative: str = "two-sided") -> tuple[float, float]:
    """One-sample t-test of values against chance: (t, p). ``two-sided`` as the public plotting.py
    (scipy's ttest_1samp default), or ``greater``. Zero spread (the same accuracy on every seed),
    as scipy answers for exactly equal values: p = 0 if the mean differs from chance in the tested
    direction, 1 if it lies on the other side, NaN if it equals chance (and for fewer than 2 values).
    Computed here, not by scipy, because rounding in scipy's mean can leave a variance of ~1e-33 and
    a p that is tiny instead of 0 (three times 0.8: p ~ 1e-32): the answer should not hang on it."""
    from scipy.stats import ttest_1samp

    if alternative not in ALTERNATIVES:
        raise UserError(f"ImageNet-X probe: t-test alternative '{alternative}', choose {' or '.join(ALTERNATIVES)}")
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return (math.nan, math.nan)
    if np.ptp(values) == 0:
        mean = float(values[0])
        if mean == chance:
            return 0.0, math.nan
        t = math.inf if mean > chance else -math.inf
        return t, 0.0 if (alternative == "two-sided" or mean > chance) else 1.0
    result = ttest_1samp(values, chance, alternative=alternative)
    return float(result.statistic), float(result.pvalue)


def sem(values: Sequence[float]) -> float:
    """Standard error of the mean as the public plotting.py draws it: np.std (ddof=0) / sqrt(n).
    (scipy.stats.sem's default, ddof=1, is sqrt(n/(n-1)) larger: 5.4 % for 10 seeds.)"""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std() / math.sqrt(len(values))) if len(values) else float("nan")


@dataclass
class _Problem:
    target: str
    seed: int
    train: np.ndarray
    test: np.ndarray


def _plan_problems(Y: pd.DataFrame, targets: Sequence[str], seeds: int, test_size: float,
                   seed: int) -> tuple[list[_Problem], dict[str, str]]:
    problems, skipped = [], {}
    for t_index, target in enumerate(targets):
        labels = Y[target].to_numpy()
        try:
            for s in range(seeds):
                # Seeds differ per target and run so that targets do not share subsamples by accident.
                tr, te = balanced_stratified_split(labels, test_size=test_size,
                                                   seed=seed * 1_000_003 + t_index * 1009 + s)
                problems.append(_Problem(target, s, tr, te))
        except UserError as err:
            skipped[target] = str(err)
    return problems, skipped


def probe_features(X: np.ndarray | Tensor, Y: pd.DataFrame, *, seeds: int = 10, test_size: float = 0.3,
                   targets: Sequence[str] = TARGETS, device: str | torch.device = "cpu", seed: int = 0,
                   C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                   dtype: torch.dtype = torch.float32, alternative: str = "two-sided",
                   unit_rule: str = "nonpositive-mean") -> pd.DataFrame:
    """Balanced logistic probes of every target, `seeds` splits each; one row per target.

    Columns: target, n_pos, n_neg, n_train, n_test, acc_mean, acc_std, acc_sem, auc_mean, auc_std,
    auc_sem, t, p_value, accs (the per-seed accuracies). std has ddof=1, sem is `sem()`. A target
    with < 2 rows in a class gets NaNs and a `note`. attrs: units kept, dropped_units, unit_rule."""
    X = torch.as_tensor(X).detach().cpu().numpy()
    X, dropped = drop_inactive_units(X, unit_rule)
    if X.shape[1] == 0:
        raise UserError(f"ImageNet-X probe: no feature unit is left by the '{unit_rule}' rule "
                        f"({dropped} dropped); try unit_rule='constant' (--drop-units constant)")
    problems, skipped = _plan_problems(Y, targets, seeds, test_size, seed)
    accs, aucs = _fit_problems(X, Y, problems, device=device, C=C, max_iter=max_iter, tol=tol, dtype=dtype)
    rows = []
    for target in targets:
        labels = Y[target].to_numpy()
        row = {"target": target, "n_pos": int((labels == 1).sum()), "n_neg": int((labels == 0).sum())}
        idx = [i for i, p in enumerate(problems) if p.target == target]
        if not idx:
            rows.append({**row, "note": skipped.get(target, "no problems")})
            continue
        a, u = accs[idx], aucs[idx]
        t, p = t_test_vs_chance(a, alternative=alternative)
        rows.append({**row, "n_train": len(problems[idx[0]].train), "n_test": len(problems[idx[0]].test),
                     "acc_mean": float(a.mean()), "acc_std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                     "acc_sem": sem(a),
                     "auc_mean": float(u.mean()), "auc_std": float(u.std(ddof=1)) if len(u) > 1 else 0.0,
                     "auc_sem": sem(u),
                     "t": t, "p_value": p, "accs": [round(float(v), 6) for v in a], "note": ""})
    table = pd.DataFrame(rows)
    table.attrs["dropped_units"] = dropped
    table.attrs["units"] = int(X.shape[1])
    table.attrs["unit_rule"] = unit_rule
    table.attrs["alternative"] = alternative
    return table


def _fit_problems(X: np.ndarray, Y: pd.DataFrame, problems: list[_Problem], *, device, C: float, max_iter: int,
                  tol: float, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """One batched fit of every (target, seed) problem; test accuracy and ROC-AUC per problem."""
    if not problems:
        return np.zeros(0), np.zeros(0)
    Xt = torch.as_tensor(X, dtype=dtype, device=device)
    n = Xt.shape[0]
    labels = torch.as_tensor(np.stack([Y[p.target].to_numpy() for p in problems]), dtype=dtype, device=device)
    train = weights_from_index([p.train for p in problems], n, Xt)
    center, scale = standardize_stats(Xt, train)
    fit = fit_logistic_batched(Xt, labels, sample_weight=train, center=center, scale=scale, C=C,
                               max_iter=max_iter, tol=tol)
    if not bool(fit.converged.all()):
        print(f"[imagenetx] {int((~fit.converged).sum())}/{len(problems)} logistic fits stopped before "
              f"tol={tol} (max_iter={max_iter} or no further decrease)", file=sys.stderr)
    scores = decision_function_batched(Xt, fit, center, scale).cpu().numpy()
    y = labels.cpu().numpy()
    accs = np.array([((scores[m, p.test] > 0) == (y[m, p.test] == 1)).mean() for m, p in enumerate(problems)])
    aucs = np.array([roc_auc(scores[m, p.test], y[m, p.test]) for m, p in enumerate(problems)])
    return accs, aucs


def results_table(per_model: dict[str, pd.DataFrame], alpha: float = ALPHA, tests: int | None = None) -> pd.DataFrame:
    """Long table (model, target, ...) with Bonferroni.

    tests: the Bonferroni count; None = every tested (target, model) pair of this table (a NaN
    p-value is not a test). `linrep reproduce imagenetx` passes the paper's 17 x 5. Adds
    tests, p_bonferroni = min(1, p * tests) and significant = p < alpha / tests."""
    frames = [df.assign(model=model, units=df.attrs.get("units"), dropped_units=df.attrs.get("dropped_units"))
              for model, df in per_model.items()]
    if not frames:
        raise UserError("ImageNet-X probe: no models to tabulate")
    table = pd.concat(frames, ignore_index=True)
    if "p_value" not in table:
        table["p_value"] = np.nan
    tested = table["p_value"].notna()
    if tests is not None and tests < 1:
        raise UserError(f"ImageNet-X probe: Bonferroni count {tests}, must be >= 1")
    tests = max(1, int(tested.sum())) if tests is None else int(tests)
    table["tests"] = tests
    table["p_bonferroni"] = (table["p_value"] * tests).clip(upper=1.0)
    table["significant"] = tested & (table["p_value"] < alpha / tests)
    first = ["model", "target", "acc_mean", "acc_std", "acc_sem", "auc_mean", "auc_std", "auc_sem", "t", "p_value",
             "p_bonferroni", "significant", "n_pos", "n_neg", "n_train", "n_test"]
    return table[[c for c in first if c in table] + [c for c in table if c not in first]]
