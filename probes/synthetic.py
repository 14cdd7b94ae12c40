"""Identifiability figures of a synthetic-DGP checkpoint (paper section 4.1, Theorem 1's cases).

On a held-out DGP sample (fixed by the data seed, probe.samples draws, split in halves):
  probe/r2_affine    R² of the affine map z̃ -> z
  probe/r2_linear    R² of the map without intercept (the figure for an orthogonal case: C1, C2, C3)
  probe/sv_mae       mean |σ - s| of the no-intercept z̃ -> z map's singular values, s the scale the
                     case predicts (`predicted_scales`); divided by their mean and compared with 1
                     where the case predicts none (C4, supervised)
  probe/r2_w         R² of the affine map from the head's rows w_j to their classes' cluster vectors
  probe/r2_w_linear  the same without intercept
  probe/sv_mae_w     mean |σ - s| of the w -> v map's singular values (the same rule for s)
  probe/beta         the head's temperature β (learned or fixed); C1 predicts β = κ
  probe/r2_g         R² of the affine map x -> z: how linear the generator itself is (the baseline)
The public code (simulation/main_diet.py, `orthogonal_linear_disentanglement`) fits the maps the same
way and compares them with `scaler=concentration` (z̃ -> z, β = 1) and 1 (w -> v).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probes.linear import fit_linear, heldout_r2, r2_score, singular_value_mae, split_halves
from trainer.config import Config
from trainer.data.synthetic import SyntheticDGP, make_generator
from trainer.models import Classifier

PROBE_STREAM = 0x9B0BE  # a seed stream no training step uses


@dataclass(frozen=True)
class PredictedScales:
    """Singular values Theorem 1 predicts for the fitted maps (None: no scale predicted).

    z: of the map z̃ -> z (no intercept); w: of the map w -> v (no intercept unless w_intercept).
    """

    z: float | None
    w: float | None
    w_intercept: bool


def diet_case(cfg: Config) -> str | None:
    """Theorem 1's case of a DIET run (None for supervised training, which Theorem 2 covers)."""
    if cfg.data.labels != "instance":
        return None
    return {(True, True): "C1", (True, False): "C2", (False, True): "C3", (False, False): "C4"}[
        (cfg.unit_features, cfg.unit_weights)]


def predicted_scales(case: str | None, kappa: float, beta: float) -> PredictedScales:
    """C1: f∘g = O and w_i = O v -> 1, 1. C2: f∘g = O, w_i = (κ/β) O v + c -> 1, β/κ (with intercept).
    C3: f∘g = (κ/β) O, w_i = O v -> β/κ, 1. C4 and supervised: linear / affine, no scale."""
    if case == "C1":
        return PredictedScales(1.0, 1.0, False)
    if case == "C2":
        return PredictedScales(1.0, beta / kappa, True)
    if case == "C3":
        return PredictedScales(beta / kappa, 1.0, False)
    return PredictedScales(None, None, True)


def heldout_sample(cfg: Config, dgp: SyntheticDGP):
    return dgp.sample(cfg.probe.samples, make_generator([cfg.data_seed, PROBE_STREAM], dgp.device))


@torch.no_grad()
def synthetic_figures(model: Classifier, cfg: Config, dgp: SyntheticDGP | None = None) -> dict[str, float]:
    dgp = dgp or SyntheticDGP(cfg.data, cfg.data_seed)
    batch = heldout_sample(cfg, dgp)
    model.eval()
    feats = model.features(batch.x.to(next(model.parameters()).device)).cpu()    # z̃: [n, d]
    z, x = batch.z.cpu(), batch.x.cpu()
    beta = model.temperature
    scales = predicted_scales(diet_case(cfg), cfg.data.kappa, beta)

    r2_affine, _ = heldout_r2(feats, z, intercept=True)
    r2_linear, lin = heldout_r2(feats, z, intercept=False)
    w, v = model.head_weights().detach().cpu(), dgp.head_targets().cpu()
    return {
        "probe/r2_affine": r2_affine,
        "probe/r2_linear": r2_linear,
        "probe/sv_mae": singular_value_mae(lin.weight, scale=scales.z),
        "probe/r2_w": head_r2(w, v),
        "probe/r2_w_linear": head_r2(w, v, intercept=False),
        "probe/sv_mae_w": head_sv_mae(w, v, scales),
        "probe/beta": beta,
        "probe/r2_g": heldout_r2(x, z, intercept=True)[0],
    }


def head_r2(w: torch.Tensor, v: torch.Tensor, *, intercept: bool = True) -> float:
    """R² of the map w_j -> v_C(j); held-out halves when there are enough rows, else in-sample."""
    n, p = w.shape
    if n >= 4 * (p + 1):
        fit_idx, score_idx = split_halves(n, seed=1)
        fit = fit_linear(w[fit_idx], v[fit_idx], intercept=intercept)
        return r2_score(v[score_idx], fit.predict(w[score_idx]))
    fit = fit_linear(w, v, intercept=intercept)
    return r2_score(v, fit.predict(w))


def head_sv_mae(w: torch.Tensor, v: torch.Tensor, scales: PredictedScales) -> float:
    """Singular-value MAE of the map w_j -> v_C(j) fitted on every row (as the public code does)."""
    return singular_value_mae(fit_linear(w, v, intercept=scales.w_intercept).weight, scale=scales.w)
