"""Many L2-regularised logistic regressions solved together in torch (CPU or GPU).

The ImageNet-X probe fits 17 targets x 10 seeds = 170 binary logistic regressions on the same
feature matrix. A loop of scikit-learn fits reads the whole matrix twice per L-BFGS iteration for
each problem (matrix-vector products: memory-bound). Here all problems share one feature matrix
``X [N, p]`` and differ only in which rows they use (``sample_weight``), their labels and their
standardisation, so one iteration of all problems costs two matrix-matrix products
``X @ V`` and ``X.T @ R`` (compute-bound, and fast on a GPU).

Objective of problem m, identical to scikit-learn's ``LogisticRegression(C=C)`` (lbfgs) on the
standardised rows ``(X - center_m) / scale_m`` with ``sample_weight_m`` (the intercept is not
penalised; scikit-learn also divides everything by the weight sum, which does not move the
minimiser but makes ``tol`` comparable)::

    f_m(w, b) = sum_i s_mi * logloss(y_mi, x_i.w + b) / S_m + 0.5 * ||w||^2 / (C * S_m)

The solver is a batched L-BFGS (two-loop recursion, Armijo backtracking per problem); a problem
leaves the batch once its gradient max-norm is below ``tol`` (scikit-learn's ``pgtol``), so late
iterations only pay for the problems still running. Its initial inverse Hessian is the inverse of
``Sigma/4 + l2_m I`` (Sigma: covariance of the z-scored features, one eigendecomposition for all
problems) for problems with at least p/2 rows: network features are strongly correlated, and this
cuts the iterations of the slowest problems about five-fold (226 -> 44 on the benchmark) without
changing the optimum.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from trainer.errors import UserError

# Relative decrease of f below which a problem counts as stalled (scipy's factr=1e7 x float eps).
_FTOL = 1e7 * 2.220446049250313e-16
_ARMIJO_C1 = 1e-4
_MAX_BACKTRACKS = 30


class LogisticFit(NamedTuple):
    """Solutions of M problems, in the standardised coordinates of each problem."""

    weight: Tensor  # [M, p]
    bias: Tensor  # [M]
    n_iter: Tensor  # [M] L-BFGS iterations used
    converged: Tensor  # [M] bool: gradient max-norm reached tol


class _Problems:
    """M logistic objectives over one shared X [N, p] (or one X per problem: [M, n, p])."""

    def __init__(self, X: Tensor, y: Tensor, sample_weight: Tensor, center: Tensor, scale: Tensor, C: float):
        self.X, self.y = X, y
        self.shared = X.dim() == 2
        weight_sum = sample_weight.sum(1)
        if bool((weight_sum <= 0).any()):
            bad = int(torch.nonzero(weight_sum <= 0)[0])
            raise UserError(f"logistic problem {bad} has no training samples (all sample weights are 0)")
        self.sw = sample_weight / weight_sum[:, None]  # per-problem mean, like scikit-learn
        self.l2 = 1.0 / (C * weight_sum)
        self.center, self.scale = center, scale

    def value_and_grad(self, theta: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """f and df/dtheta of the problems `active` at theta [|A|, p+1] (last column = bias)."""
        w, b = theta[:, :-1], theta[:, -1]
        center, scale = self.center[active], self.scale[active]
        # Standardisation folded into the weights: ((x - c)/s).w + b = x.(w/s) + (b - c.(w/s)).
        v = w / scale
        offset = b - (center * v).sum(1)
        z = self._matmul(v, active) + offset[:, None]  # [|A|, N]
        y, sw = self.y[active], self.sw[active]
        f = (sw * (F.softplus(z) - y * z)).sum(1) + 0.5 * self.l2[active] * (w * w).sum(1)
        residual = sw * (torch.sigmoid(z) - y)  # d f / d z
        grad_offset = residual.sum(1)
        grad_v = self._matmul_t(residual, active)  # [|A|, p]
        grad_w = (grad_v - center * grad_offset[:, None]) / scale + self.l2[active, None] * w
        return f, torch.cat([grad_w, grad_offset[:, None]], 1)

    def _matmul(self, v: Tensor, active: Tensor) -> Tensor:
        if self.shared:
            return (self.X @ v.T).T
        return torch.bmm(self.X[active], v[:, :, None])[:, :, 0]

    def _matmul_t(self, r: Tensor, active: Tensor) -> Tensor:
        if self.shared:
            return r @ self.X
        return torch.bmm(r[:, None, :], self.X[active])[:, 0, :]


class _Preconditioner:
    """H0 of L-BFGS: the inverse of the logistic Hessian at the start, (c * Sigma + l2_m I)^-1.

    Sigma is the covariance of the globally z-scored features (one eigendecomposition shared by
    all problems); c = 1/4 is the curvature p(1-p) at p = 1/2; l2_m is each problem's own penalty.
    Features of real networks are strongly correlated, which makes plain L-BFGS crawl (hundreds of
    iterations); with this H0 it needs tens. Problems with few rows (whose own covariance is far
    from Sigma) keep the usual scaled identity."""

    CURVATURE = 0.25
    MAX_ROWS = 4096

    def __init__(self, X: Tensor, l2: Tensor, use: Tensor):
        rows = X if X.dim() == 2 else X.reshape(-1, X.shape[-1])
        rows = rows[:: max(1, rows.shape[0] // self.MAX_ROWS)]  # a preconditioner needs no exact covariance
        mean = rows.mean(0)
        std = rows.std(0).clamp_min(1e-12)
        z = (rows - mean) / std
        cov = (z.T @ z) / max(1, z.shape[0] - 1)
        evals, self.evecs = torch.linalg.eigh(cov.double())
        self.evecs = self.evecs.to(X.dtype)
        self.denominator = (self.CURVATURE * evals.clamp_min(0).to(X.dtype))[None, :] + l2[:, None]  # [M, p]
        self.use = use

    def apply(self, q: Tensor, active: Tensor, gamma: Tensor) -> Tensor:
        """H0 q for the rows of `active` (last column = bias)."""
        out = gamma[:, None] * q
        use = self.use[active]
        if bool(use.any()):
            idx = torch.nonzero(use)[:, 0]
            qw = q[idx, :-1]
            rw = ((qw @ self.evecs) / self.denominator[active[idx]]) @ self.evecs.T
            out[idx, :-1] = gamma[idx, None] * rw
            out[idx, -1] = gamma[idx] * q[idx, -1] / self.CURVATURE
        return out


def _as_problem_tensor(t: Tensor | None, m: int, p: int, default: float, like: Tensor) -> Tensor:
    if t is None:
        return torch.full((m, p), default, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(m, p) if t.dim() == 1 else t


def _check_shapes(X: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
    rows = X.shape[0] if X.dim() == 2 else X.shape[1]
    if X.dim() not in (2, 3) or y.dim() != 2 or y.shape[1] != rows or (X.dim() == 3 and X.shape[0] != y.shape[0]):
        raise UserError(f"logistic probe: X {tuple(X.shape)} and y {tuple(y.shape)} do not match "
                        "(want X [N, p] with y [M, N], or X [M, n, p] with y [M, n])")
    if sample_weight is not None and sample_weight.shape != y.shape:
        raise UserError(f"logistic probe: sample_weight {tuple(sample_weight.shape)} must match y {tuple(y.shape)}")


def fit_logistic_batched(
    X: Tensor,
    y: Tensor,
    *,
    sample_weight: Tensor | None = None,
    center: Tensor | None = None,
    scale: Tensor | None = None,
    C: float = 1.0,
    max_iter: int = 1000,
    tol: float = 1e-4,
    ftol: float = _FTOL,
    history: int = 10,
    precondition: bool = True,
    precondition_min_rows: int | None = None,
) -> LogisticFit:
    """Fit M independent L2 logistic regressions together (scikit-learn's lbfgs objective).

    X: [N, p] shared by all problems, or [M, n, p] one matrix per problem.
    y: [M, N] (or [M, n]) labels in {0, 1}.
    sample_weight: like y, >= 0; 0 leaves a row out of a problem (index sets -> `weights_from_index`).
    center, scale: [M, p] or [p]; problem m is fit on (X - center_m) / scale_m (z-scoring with the
        statistics of its own training rows, without materialising M standardised copies).
    Stops a problem when its gradient max-norm is <= tol, or its relative decrease of f is <= ftol
    (both as scipy's L-BFGS-B, which scikit-learn uses); `converged` is False only for problems
    that hit max_iter or whose line search failed.
    precondition: use the feature-covariance H0 (see module docstring) for problems with at least
        `precondition_min_rows` rows (default p/2); the optimum is the same either way.
    The dtype and device of X are used throughout (float64 for tight agreement, float32 for speed).
    """
    if not X.is_floating_point():
        X = X.float()
    y = torch.as_tensor(y, dtype=X.dtype, device=X.device)
    _check_shapes(X, y, sample_weight)
    m, p = y.shape[0], X.shape[-1]
    sw = torch.ones_like(y) if sample_weight is None else torch.as_tensor(sample_weight, dtype=X.dtype, device=X.device)
    problems = _Problems(X, y, sw, _as_problem_tensor(center, m, p, 0.0, X),
                         _as_problem_tensor(scale, m, p, 1.0, X), C)
    precond = None
    if precondition:
        rows = sw.gt(0).sum(1)
        min_rows = p // 2 if precondition_min_rows is None else precondition_min_rows
        use = rows >= min_rows
        if bool(use.any()):
            precond = _Preconditioner(X, problems.l2, use)
    return _lbfgs(problems, m, p + 1, X, max_iter=max_iter, tol=tol, ftol=ftol, history=history, precond=precond)


def _two_loop(g: Tensor, s_hist: Tensor, y_hist: Tensor, rho: Tensor, h0: Callable[[Tensor], Tensor],
              order: list[int]) -> Tensor:
    """-H g for each row, H the L-BFGS inverse-Hessian estimate (entries with rho=0 are no-ops)."""
    q = g.clone()
    alphas = {}
    for j in reversed(order):
        alphas[j] = rho[:, j] * (s_hist[:, j] * q).sum(1)
        q -= alphas[j][:, None] * y_hist[:, j]
    r = h0(q)
    for j in order:
        beta = rho[:, j] * (y_hist[:, j] * r).sum(1)
        r += s_hist[:, j] * (alphas[j] - beta)[:, None]
    return -r


def _lbfgs(problems: _Problems, m: int, dim: int, like: Tensor, *, max_iter: int, tol: float, ftol: float,
           history: int, precond: _Preconditioner | None = None) -> LogisticFit:
    """Batched L-BFGS; every problem keeps its own history, step length and stopping time."""
    kw = dict(dtype=like.dtype, device=like.device)
    theta = torch.zeros(m, dim, **kw)
    s_hist = torch.zeros(m, history, dim, **kw)
    y_hist = torch.zeros(m, history, dim, **kw)
    rho = torch.zeros(m, history, **kw)
    gamma = torch.ones(m, **kw)
    n_iter = torch.zeros(m, dtype=torch.long, device=like.device)
    converged = torch.zeros(m, dtype=torch.bool, device=like.device)
    active = torch.arange(m, device=like.device)
    f, g = problems.value_and_grad(theta, active)
    f_all, g_all = f.clone(), g.clone()
    converged |= g.abs().amax(1) <= tol
    active = active[~converged]
    for it in range(max_iter):
        if active.numel() == 0:
            break
        f, g = f_all[active], g_all[active]
        order = [(it - k) % history for k in range(min(it, history), 0, -1)]
        h0 = _initial_inverse_hessian(precond, active, gamma[active])
        d = _two_loop(g, s_hist[active], y_hist[active], rho[active], h0, order)
        slope = (g * d).sum(1)
        not_descent = slope >= 0  # a numerically broken history: restart from steepest descent
        if bool(not_descent.any()):
            d[not_descent] = -g[not_descent]
            slope = (g * d).sum(1)
            rho[active[not_descent]] = 0
        # First step of a fresh history: scale so that it moves about one unit (as torch's LBFGS),
        # unless H0 already has the scale of the inverse Hessian.
        step = torch.ones_like(f)
        if it == 0:
            unscaled = torch.ones_like(f, dtype=torch.bool) if precond is None else ~precond.use[active]
            step = torch.where(unscaled, torch.clamp(1.0 / g.abs().sum(1), max=1.0), step)
        f_new, g_new, step, ok = _backtrack(problems, theta[active], active, f, d, slope, step)
        s = step[:, None] * d
        theta[active] += s
        yk = g_new - g
        sy, yy = (s * yk).sum(1), (yk * yk).sum(1)
        valid = (sy > 1e-10 * yy) & ok
        slot = it % history
        s_hist[active, slot] = s
        y_hist[active, slot] = yk
        rho[active, slot] = torch.where(valid, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        if precond is None:
            gamma[active] = torch.where(valid, sy / yy.clamp_min(1e-30), gamma[active])
        else:  # scale H0 to the latest curvature pair: gamma = s.y / y.H0 y (H0 = gamma-free preconditioner)
            yhy = (yk * precond.apply(yk, active, torch.ones_like(sy))).sum(1)
            gamma[active] = torch.where(valid, sy / yhy.clamp_min(1e-30), gamma[active])
        f_all[active], g_all[active] = f_new, g_new
        n_iter[active] += 1
        done_grad = g_new.abs().amax(1) <= tol
        done_f = ok & ((f - f_new) <= ftol * torch.maximum(f.abs(), f_new.abs()).clamp_min(1.0))
        converged[active] |= done_grad | done_f
        active = active[~(done_grad | done_f | ~ok)]
    return LogisticFit(theta[:, :-1], theta[:, -1], n_iter, converged)


def _initial_inverse_hessian(precond: _Preconditioner | None, active: Tensor,
                             gamma: Tensor) -> Callable[[Tensor], Tensor]:
    if precond is None:
        return lambda q: gamma[:, None] * q
    return lambda q: precond.apply(q, active, gamma)


def _backtrack(problems: _Problems, theta: Tensor, active: Tensor, f: Tensor, d: Tensor, slope: Tensor,
               step: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Armijo backtracking for every problem at once; only rejected problems are re-evaluated."""
    f_new, g_new = problems.value_and_grad(theta + step[:, None] * d, active)
    ok = f_new <= f + _ARMIJO_C1 * step * slope
    for _ in range(_MAX_BACKTRACKS):
        if bool(ok.all()):
            break
        todo = torch.nonzero(~ok)[:, 0]
        step[todo] *= 0.5
        f_t, g_t = problems.value_and_grad(theta[todo] + step[todo, None] * d[todo], active[todo])
        f_new[todo], g_new[todo] = f_t, g_t
        ok[todo] = f_t <= f[todo] + _ARMIJO_C1 * step[todo] * slope[todo]
    # A failed search keeps the old point (step 0) and stops that problem.
    step = torch.where(ok, step, torch.zeros_like(step))
    f_new = torch.where(ok, f_new, f)
    return f_new, g_new, step, ok


def decision_function_batched(X: Tensor, fit: LogisticFit, center: Tensor | None = None,
                              scale: Tensor | None = None) -> Tensor:
    """Logits [M, N] of every problem on every row of a shared X [N, p] (or [M, n, p])."""
    m, p = fit.weight.shape
    center = _as_problem_tensor(center, m, p, 0.0, X)
    scale = _as_problem_tensor(scale, m, p, 1.0, X)
    v = fit.weight.to(X.dtype) / scale
    offset = fit.bias.to(X.dtype) - (center * v).sum(1)
    z = (X @ v.T).T if X.dim() == 2 else torch.bmm(X, v[:, :, None])[:, :, 0]
    return z + offset[:, None]


def weights_from_index(index_sets: list[Tensor] | list[np.ndarray], n: int, like: Tensor) -> Tensor:
    """Index sets (rows of each problem) -> 0/1 sample weights [M, n] for a shared X."""
    w = torch.zeros(len(index_sets), n, dtype=like.dtype, device=like.device)
    for m, idx in enumerate(index_sets):
        w[m, torch.as_tensor(idx, device=like.device, dtype=torch.long)] = 1.0
    return w


def standardize_stats(X: Tensor, sample_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-problem mean and std [M, p] of the rows each problem trains on (std 0 -> 1).

    Like scikit-learn's StandardScaler on the training rows (population std)."""
    w = sample_weight / sample_weight.sum(1, keepdim=True)
    mean = w @ X
    var = (w @ (X * X) - mean * mean).clamp_min(0)
    std = var.sqrt()
    return mean, torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))


# ---- the probe protocol's splits ----------------------------------------------------------

def balanced_stratified_split(y: np.ndarray, *, test_size: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balance a binary target by subsampling the majority class, then split each class 70/30.

    Both halves are balanced, so chance accuracy is exactly 0.5. Returns sorted row indices
    (train, test). Raises UserError when a class has fewer than 2 rows."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    per_class = min(len(pos), len(neg))
    if per_class < 2:
        raise UserError(f"target has {len(pos)} positive and {len(neg)} negative rows: need >= 2 of each")
    n_test = min(max(1, int(round(test_size * per_class))), per_class - 1)
    train, test = [], []
    for rows in (pos, neg):
        chosen = rng.permutation(rows)[:per_class]
        test.append(chosen[:n_test])
        train.append(chosen[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---- benchmark: batched torch vs a loop of scikit-learn fits --------------------------------

# Prevalence of the 16 ImageNet-X factors (multi-factor annotations, validation set) and of the
# binarised class: the benchmark's targets have the same imbalance as the real probe.
IMAGENETX_PREVALENCE = (0.870, 0.769, 0.345, 0.280, 0.060, 0.040, 0.033, 0.076, 0.019, 0.008,
                        0.011, 0.004, 0.002, 0.013, 0.002, 0.038, 0.497)


def make_probe_problems(n: int, p: int, targets: int, seeds: int, *, seed: int = 0, test_size: float = 0.3):
    """Synthetic features + targets and the probe protocol's (target, seed) splits.

    Returns X [n, p] float32 (numpy), Y [targets, n] in {0,1}, and a list of (target, train_idx,
    test_idx) per problem: classes balanced by subsampling, stratified split."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 32)).astype(np.float32)
    X = np.maximum(latent @ rng.standard_normal((32, p)).astype(np.float32)
                   + 0.5 * rng.standard_normal((n, p)).astype(np.float32), 0)  # ReLU-like features
    prevalence = np.maximum(np.resize(np.asarray(IMAGENETX_PREVALENCE), targets), 5 / n)  # >= 5 positives
    score = latent @ rng.standard_normal((32, targets)) + 2.0 * rng.standard_normal((n, targets))
    cut = np.array([np.quantile(score[:, t], 1 - prevalence[t]) for t in range(targets)])
    Y = (score > cut).T.astype(np.int64)
    problems = [(t, *balanced_stratified_split(Y[t], test_size=test_size, seed=s))
                for t in range(targets) for s in range(seeds)]
    return X, Y, problems


def fit_problems_batched(X: np.ndarray, Y: np.ndarray, problems, *, device: str = "cpu",
                         dtype: torch.dtype = torch.float32, C: float = 1.0, max_iter: int = 1000,
                         tol: float = 1e-4) -> np.ndarray:
    """Fit every (target, train, test) problem in one batched solve; test accuracy per problem."""
    Xt = torch.as_tensor(X, dtype=dtype, device=device)
    n = Xt.shape[0]
    train = weights_from_index([tr for _, tr, _ in problems], n, Xt)
    labels = torch.as_tensor(Y[[t for t, _, _ in problems]], dtype=dtype, device=device)
    center, scale = standardize_stats(Xt, train)
    fit = fit_logistic_batched(Xt, labels, sample_weight=train, center=center, scale=scale, C=C,
                               max_iter=max_iter, tol=tol)
    pred = (decision_function_batched(Xt, fit, center, scale) > 0).to(dtype)
    acc = [(pred[m, te] == labels[m, te]).float().mean().item() for m, (_, _, te) in enumerate(problems)]
    return np.asarray(acc)


def fit_problems_sklearn(X: np.ndarray, Y: np.ndarray, problems, *, C: float = 1.0, max_iter: int = 1000,
                         tol: float = 1e-4) -> np.ndarray:
    """The reference: one scikit-learn LogisticRegression per problem, same z-scoring; accuracies."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    acc = []
    for t, tr, te in problems:
        mean = X[tr].mean(0)
        std = X[tr].std(0)
        std = np.where(std > 1e-12 * (1 + np.abs(mean)), std, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol).fit((X[tr] - mean) / std, Y[t, tr])
        acc.append(float((clf.predict((X[te] - mean) / std) == Y[t, te]).mean()))
    return np.asarray(acc)


def bench_logistic(n: int = 10000, p: int = 2048, targets: int = 17, seeds: int = 10, *, device: str = "cpu",
                   seed: int = 0, max_iter: int = 1000, tol: float = 1e-4, verbose: bool = True) -> dict:
    """Time the batched probe against a loop of scikit-learn fits on the same splits.

    Returns {"times": {"batched": s, "sklearn": s} (wall), "ratio": sklearn/batched, "cpu_times",
    "cpu_ratio" (process CPU seconds), "max_acc_diff" / "mean_acc_diff": |accuracy difference| over
    problems, "problems": M, ...}. The full size takes ~4 + 20 minutes on 2 busy CPU cores."""
    X, Y, problems = make_probe_problems(n, p, targets, seeds, seed=seed)
    if device != "cpu":  # warm the device up so that start-up is not timed
        fit_problems_batched(X[:256], Y[:, :256], problems[:1], device=device, max_iter=2)
    t0, c0 = time.perf_counter(), time.process_time()
    acc_batched = fit_problems_batched(X, Y, problems, device=device, max_iter=max_iter, tol=tol)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t1, c1 = time.perf_counter(), time.process_time()
    acc_sklearn = fit_problems_sklearn(X, Y, problems, max_iter=max_iter, tol=tol)
    t2, c2 = time.perf_counter(), time.process_time()
    # CPU seconds (all threads of this process) next to wall seconds: on a shared machine the load
    # can change between the two phases; CPU time measures the work itself.
    out = {"times": {"batched": t1 - t0, "sklearn": t2 - t1}, "ratio": (t2 - t1) / (t1 - t0),
           "cpu_times": {"batched": c1 - c0, "sklearn": c2 - c1}, "cpu_ratio": (c2 - c1) / max(c1 - c0, 1e-9),
           "max_acc_diff": float(np.abs(acc_batched - acc_sklearn).max()),
           "mean_acc_diff": float(np.abs(acc_batched - acc_sklearn).mean()),
           "mean_acc": {"batched": float(acc_batched.mean()), "sklearn": float(acc_sklearn.mean())},
           "problems": len(problems), "shape": [n, p], "device": device, "threads": torch.get_num_threads()}
    if verbose:
        print(f"logistic probe bench: {len(problems)} problems on {n}x{p} ({device}): batched "
              f"{out['times']['batched']:.1f}s, sklearn {out['times']['sklearn']:.1f}s, "
              f"ratio {out['ratio']:.1f}x (CPU time ratio {out['cpu_ratio']:.1f}x), "
              f"max |acc diff| {out['max_acc_diff']:.4f}", file=sys.stderr)
    return out
