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


class StreamedLeastSquares:
    """Least squares y ≈ x W + b over a stream of batches, without holding x: float64 sums of x, y,
    x^T x, x^T y and y² (each taken about a shift, the first batch's means, which keeps the centring
    well conditioned), solved once by `fit` with fit_linear's normal equations, ridge and fallback.
    Memory: p x p + p x k, whatever the number of rows (a whole training split)."""

    def __init__(self, device=None):
        self.device = device
        self.n = 0

    def add(self, x: Tensor, y: Tensor) -> None:
        x = x.to(self.device, torch.float64).flatten(1)
        y = y.to(self.device, torch.float64).reshape(len(y), -1)
        if len(x) == 0:
            return
        if self.n == 0:
            self.x0, self.y0 = x.mean(0), y.mean(0)
            p, k = x.shape[1], y.shape[1]
            z = dict(dtype=torch.float64, device=x.device)
            self.sx, self.sy, self.syy = torch.zeros(p, **z), torch.zeros(k, **z), torch.zeros(k, **z)
            self.xx, self.xy = torch.zeros(p, p, **z), torch.zeros(p, k, **z)
        xc, yc = x - self.x0, y - self.y0
        self.sx += xc.sum(0)
        self.sy += yc.sum(0)
        self.syy += yc.pow(2).sum(0)
        self.xx.addmm_(xc.T, xc)    # in place: no p x p temporary (dSprites pixels: 128 MB a batch)
        self.xy.addmm_(xc.T, yc)
        self.n += len(x)

    def _check(self) -> None:
        if self.n < 2:
            raise ValueError(f"streamed least squares needs >= 2 rows, got {self.n}")

    def x_std(self) -> Tensor:
        """Sample std (ddof=1) of each column of x."""
        self._check()
        return ((self.xx.diagonal() - self.sx.pow(2) / self.n) / (self.n - 1)).clamp(min=0).sqrt()

    def y_mean(self) -> Tensor:
        self._check()
        return self.y0 + self.sy / self.n

    def y_std(self) -> Tensor:
        """Sample std (ddof=1) of each column of y."""
        self._check()
        return ((self.syy - self.sy.pow(2) / self.n) / (self.n - 1)).clamp(min=0).sqrt()

    def fit(self, live: Tensor | None = None, *, ridge: float = 1e-10) -> LinearFit:
        """The intercept fit over every row added; columns outside `live` (bool [p]) get weight 0."""
        self._check()
        mx, my = self.sx / self.n, self.sy / self.n                 # means about the shift
        gram = self.xx - self.n * torch.outer(mx, mx)               # centred x^T x
        rhs = self.xy - self.n * torch.outer(mx, my)                # centred x^T y
        if live is not None:
            live = live.to(gram.device)
            gram, rhs = gram[live][:, live], rhs[live]
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        chol, info = torch.linalg.cholesky_ex(gram + ridge * gram.diagonal().mean().clamp(min=1e-12) * eye)
        if int(info) == 0:
            w = torch.cholesky_solve(rhs, chol)
        else:  # rank-deficient features: the minimum-norm solution of the normal equations
            w = torch.linalg.lstsq(gram.cpu(), rhs.cpu(), driver="gelsd").solution.to(gram.device)
        weight = torch.zeros(self.xx.shape[0], rhs.shape[1], dtype=w.dtype, device=w.device)
        if live is None:
            weight = w
        else:
            weight[live] = w
        bias = (self.y0 + my) - (self.x0 + mx) @ weight
        return LinearFit(weight, bias)
