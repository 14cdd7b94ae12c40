"""Closed-form linear decoders in torch (float64): least squares, R², Pearson r.

The normal equations are solved with a Cholesky factorisation (a tiny ridge keeps them positive
definite); this is what makes a 100,000 x 512 probe take well under a second, with no
scikit-learn in the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LinearFit:
    weight: Tensor          # [p, k]: y ≈ x @ weight + bias
    bias: Tensor            # [k] (zeros without intercept)

    def predict(self, x: Tensor) -> Tensor:
        return x.to(self.weight.dtype) @ self.weight + self.bias


def fit_linear(x: Tensor, y: Tensor, *, intercept: bool = True, ridge: float = 1e-10) -> LinearFit:
    """Least squares y ≈ x W (+ b) in float64. x: [n, p], y: [n, k]."""
    x = x.double()
    y = y.double()
    if intercept:
        xm, ym = x.mean(0), y.mean(0)
        x, y = x - xm, y - ym
    gram = x.T @ x                                                     # [p, p]
    gram = gram + ridge * gram.diagonal().mean().clamp(min=1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    rhs = x.T @ y                                                      # [p, k]
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        weight = torch.cholesky_solve(rhs, chol)
    else:  # rank-deficient features (dead units): fall back to a least-squares solver
        weight = torch.linalg.lstsq(x.cpu(), y.cpu(), driver="gelsd").solution.to(x.device)
    bias = (ym - xm @ weight) if intercept else torch.zeros(y.shape[1], dtype=y.dtype, device=y.device)
    return LinearFit(weight, bias)


def r2_score(y_true: Tensor, y_pred: Tensor) -> float:
    """Coefficient of determination, averaged uniformly over output columns (sklearn's default)."""
    y_true, y_pred = y_true.double(), y_pred.double()
    ss_res = (y_true - y_pred).pow(2).sum(0)
    ss_tot = (y_true - y_true.mean(0)).pow(2).sum(0).clamp(min=1e-12)
    return float((1 - ss_res / ss_tot).mean())


def pearson_r(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).clamp(min=1e-12)
    return float((a @ b) / denom)


def split_halves(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Fixed random halves (fit, score) of n rows."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2], perm[n // 2:]


def heldout_r2(x: Tensor, y: Tensor, *, intercept: bool = True, seed: int = 0) -> tuple[float, LinearFit]:
    """Fit y ≈ x on one half, R² on the other."""
    fit_idx, score_idx = split_halves(x.shape[0], seed)
    fit = fit_linear(x[fit_idx], y[fit_idx], intercept=intercept)
    return r2_score(y[score_idx], fit.predict(x[score_idx])), fit


def singular_value_mae(weight: Tensor, *, scale: float | None = None) -> float:
    """Mean |σ_i - scale| of a map's singular values: how far it is from `scale` x an orthogonal map.

    `scale` is what the theory predicts (the public code's `scaler`: orthogonal_linear_disentanglement
    compares the z̃->z map with 1/κ and the w->v map with 1). None: the case predicts no scale, so the
    singular values are divided by their mean first and compared with 1 (a scaled-orthogonal map
    scores 0, whatever its scale).
    """
    s = torch.linalg.svdvals(weight.double())
    if scale is None:
        return float((s / s.mean().clamp(min=1e-12) - 1).abs().mean())
    return float((s - scale).abs().mean())
