"""Theorem 1's four DIET cases: each preset's case, the scale each case predicts, and the figures
(probe/sv_mae, probe/sv_mae_w, the R²s, probe/beta) on known maps: 0 against the right scale, not
against a wrong one. Fast: no Ray, no training."""

from __future__ import annotations

import pytest
import torch

from probes.linear import heldout_r2, singular_value_mae
from probes.synthetic import diet_case, head_sv_mae, predicted_scales, synthetic_figures
from trainer.config import load_config
from trainer.data.synthetic import SyntheticDGP, uniform_sphere
from trainer.models import Classifier

KAPPA = 10.0


def orthogonal(d: int = 5, seed: int = 8) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))[0]


@pytest.mark.parametrize("preset,case", [("synthetic-diet", "C3"), ("synthetic-diet-c4", "C4"),
                                         ("synthetic-diet-c1", "C1"), ("synthetic-diet-c2", "C2"),
                                         ("synthetic-supervised", None)])
def test_each_preset_is_its_case(preset, case):
    cfg = load_config(preset)
    assert diet_case(cfg) == case
    if case in ("C3", "C4"):  # the public script's setting: f(x) free, β = 1 fixed
        assert cfg.model.temperature == 1.0 and not cfg.model.learn_temperature and not cfg.unit_features
    if case == "C1":
        assert cfg.model.learn_temperature


def test_predicted_scales_follow_theorem_1():
    beta = 2.0
    assert predicted_scales("C1", KAPPA, beta) == predicted_scales("C1", KAPPA, 1.0)
    assert (predicted_scales("C1", KAPPA, beta).z, predicted_scales("C1", KAPPA, beta).w) == (1.0, 1.0)
    assert (predicted_scales("C2", KAPPA, beta).z, predicted_scales("C2", KAPPA, beta).w) == (1.0, beta / KAPPA)
    assert (predicted_scales("C3", KAPPA, beta).z, predicted_scales("C3", KAPPA, beta).w) == (beta / KAPPA, 1.0)
    for case in ("C4", None):
        assert (predicted_scales(case, KAPPA, beta).z, predicted_scales(case, KAPPA, beta).w) == (None, None)


def test_z_map_of_kappa_times_orthogonal_scores_zero_against_its_scale_only():
    """f∘g = κ O (C3 at β = 1): the fitted z̃ -> z map is O^T / κ, the public code's `scaler=concentration`."""
    z = uniform_sphere(4096, 5, torch.Generator().manual_seed(0))
    r2, fit = heldout_r2(KAPPA * z @ orthogonal(), z, intercept=False)
    assert r2 == pytest.approx(1.0, abs=1e-6)
    assert singular_value_mae(fit.weight, scale=1 / KAPPA) < 1e-6
    assert singular_value_mae(fit.weight, scale=1.0) == pytest.approx(1 - 1 / KAPPA, abs=1e-6)


def test_w_map_scores_zero_against_its_scale_only():
    v = uniform_sphere(1000, 5, torch.Generator().manual_seed(1))
    Q = orthogonal(seed=2)
    # C3: w = O v -> the w -> v map is orthogonal
    assert head_sv_mae(v @ Q, v, predicted_scales("C3", KAPPA, 1.0)) < 1e-6
    # C2: w = (κ/β) O v + c -> singular values β/κ (with intercept); against 1 it is far off
    beta = 2.0
    w = (KAPPA / beta) * v @ Q + 0.3
    assert head_sv_mae(w, v, predicted_scales("C2", KAPPA, beta)) < 1e-6
    assert head_sv_mae(w, v, predicted_scales("C3", KAPPA, beta)) > 0.7


class _Oracle(torch.nn.Module):
    """f = scale x g^{-1} followed by an orthogonal map: the ideal encoder of a case."""

    def __init__(self, dgp, Q, scale):
        super().__init__()
        self.dgp, self.Q, self.scale = dgp, Q, scale

    def forward(self, x):
        return self.scale * self.dgp.g.inverse(x) @ self.Q


def oracle_figures(preset: str, feature_scale: float, head_of_v, beta: float) -> dict[str, float]:
    cfg = load_config(preset, ["data.generator_pool=500", "probe.samples=4096"])
    dgp = SyntheticDGP(cfg.data, cfg.data_seed)
    Q = orthogonal()
    model = Classifier(_Oracle(dgp, Q, feature_scale), 5, dgp.num_outputs, unit_features=cfg.unit_features,
                       unit_weights=cfg.unit_weights, temperature=beta, learn_temperature=False)
    with torch.no_grad():
        model.head.copy_(head_of_v(dgp.head_targets() @ Q))
    return synthetic_figures(model, cfg, dgp)


def test_c3_oracle_scores_zero_with_the_public_scaler():
    figs = oracle_figures("synthetic-diet", KAPPA, lambda vq: vq, beta=1.0)
    assert figs["probe/r2_linear"] > 0.9999 and figs["probe/r2_w_linear"] > 0.9999
    assert figs["probe/sv_mae"] < 1e-4 and figs["probe/sv_mae_w"] < 1e-4 and figs["probe/beta"] == 1.0
    # the same encoder at the wrong scale (f∘g = O where C3 at β=1 predicts κ O): off by 1 - 1/κ
    wrong = oracle_figures("synthetic-diet", 1.0, lambda vq: vq, beta=1.0)
    assert wrong["probe/r2_linear"] > 0.9999 and wrong["probe/sv_mae"] == pytest.approx(1 - 1 / KAPPA, abs=1e-3)


def test_c1_oracle_and_its_beta():
    figs = oracle_figures("synthetic-diet-c1", 1.0, lambda vq: vq, beta=KAPPA)
    assert figs["probe/sv_mae"] < 1e-4 and figs["probe/sv_mae_w"] < 1e-4
    assert figs["probe/beta"] == pytest.approx(KAPPA)


def test_c2_oracle_with_scaled_free_rows():
    beta = 2.0
    figs = oracle_figures("synthetic-diet-c2", 1.0, lambda vq: (KAPPA / beta) * vq + 0.1, beta=beta)
    assert figs["probe/r2_affine"] > 0.9999 and figs["probe/r2_w"] > 0.9999
    assert figs["probe/sv_mae"] < 1e-4 and figs["probe/sv_mae_w"] < 1e-4


def test_c4_oracle_is_scored_up_to_scale():
    figs = oracle_figures("synthetic-diet-c4", 3.0, lambda vq: 2.0 * vq + 0.1, beta=1.0)
    assert figs["probe/r2_affine"] > 0.9999 and figs["probe/r2_w"] > 0.9999
    assert figs["probe/sv_mae"] < 1e-4 and figs["probe/sv_mae_w"] < 1e-4   # no scale predicted: rescaled
