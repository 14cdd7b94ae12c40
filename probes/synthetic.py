"""Identifiability figures of a synthetic-DGP checkpoint (paper section 4.1).

On a held-out DGP sample (fixed by the data seed, probe.samples draws, split in halves):
  probe/r2_affine   R² of the affine map z̃ -> z
  probe/r2_linear   R² of the map without intercept
  probe/sv_mae      mean |σ - 1| of that map's singular values (rescaled by their mean when f(x)
                    is not unit-norm: C3/C4/supervised identify f∘g only up to scale)
  probe/r2_w        R² of the affine map from the head's rows w_j to their classes' cluster vectors
  probe/r2_g        R² of the affine map x -> z: how linear the generator itself is (the baseline)
"""

from __future__ import annotations

import torch

from probes.linear import fit_linear, heldout_r2, r2_score, singular_value_mae, split_halves
from trainer.config import Config
from trainer.data.synthetic import SyntheticDGP, make_generator
from trainer.models import Classifier

PROBE_STREAM = 0x9B0BE  # a seed stream no training step uses


def heldout_sample(cfg: Config, dgp: SyntheticDGP):
    return dgp.sample(cfg.probe.samples, make_generator([cfg.data_seed, PROBE_STREAM], dgp.device))


@torch.no_grad()
def synthetic_figures(model: Classifier, cfg: Config, dgp: SyntheticDGP | None = None) -> dict[str, float]:
    dgp = dgp or SyntheticDGP(cfg.data, cfg.data_seed)
    batch = heldout_sample(cfg, dgp)
    model.eval()
    feats = model.features(batch.x.to(next(model.parameters()).device)).cpu()    # z̃: [n, d]
    z, x = batch.z.cpu(), batch.x.cpu()

    r2_affine, _ = heldout_r2(feats, z, intercept=True)
    r2_linear, lin = heldout_r2(feats, z, intercept=False)
    out = {
        "probe/r2_affine": r2_affine,
        "probe/r2_linear": r2_linear,
        "probe/sv_mae": singular_value_mae(lin.weight, rescale=not cfg.unit_features),
        "probe/r2_w": head_r2(model.head_weights().detach().cpu(), dgp.head_targets().cpu()),
        "probe/r2_g": heldout_r2(x, z, intercept=True)[0],
    }
    return out


def head_r2(w: torch.Tensor, v: torch.Tensor) -> float:
    """R² of the affine map w_j -> v_C(j); held-out halves when there are enough rows, else in-sample."""
    n, p = w.shape
    if n >= 4 * (p + 1):
        fit_idx, score_idx = split_halves(n, seed=1)
        fit = fit_linear(w[fit_idx], v[fit_idx])
        return r2_score(v[score_idx], fit.predict(w[score_idx]))
    fit = fit_linear(w, v)
    return r2_score(v, fit.predict(w))
