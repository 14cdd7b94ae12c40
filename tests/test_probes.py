"""Closed-form probes on known maps: R² = 1 for linear, < 1 for nonlinear, MAE ≈ 0 for orthogonal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probes.linear import fit_linear, heldout_r2, pearson_r, r2_score, singular_value_mae
from probes.synthetic import head_r2, synthetic_figures
from trainer.config import load_config
from trainer.data.synthetic import SyntheticDGP, uniform_sphere
from trainer.models import Classifier, InputSpec, build_classifier


def sphere(n=8192, d=5, seed=0):
    return uniform_sphere(n, d, torch.Generator().manual_seed(seed))


def test_linear_map_gives_r2_one():
    z = sphere()
    A = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    r2, fit = heldout_r2(z @ A.T + 3.0, z)
    assert r2 == pytest.approx(1.0, abs=1e-9)


def test_nonlinear_map_gives_r2_clearly_below_one():
    z = sphere()
    feats = torch.cat([torch.tanh(4 * z), z.pow(3)], dim=1) ** 2
    r2, _ = heldout_r2(feats, z)
    assert r2 < 0.6


def test_orthogonal_map_has_zero_singular_value_error():
    z = sphere()
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(2)))
    r2, fit = heldout_r2(z @ Q, z, intercept=False)
    assert r2 == pytest.approx(1.0, abs=1e-9)
    assert singular_value_mae(fit.weight, scale=1.0) < 1e-6
    # a scaled orthogonal map is orthogonal after rescaling, not before
    _, fit2 = heldout_r2(3 * z @ Q, z, intercept=False)
    assert singular_value_mae(fit2.weight) < 1e-6
    assert singular_value_mae(fit2.weight, scale=1.0) > 0.5


def test_fit_linear_matches_numpy_lstsq():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(500, 12, generator=g), torch.randn(500, 3, generator=g)
    fit = fit_linear(x, y)
    X1 = np.hstack([x.numpy(), np.ones((500, 1))]).astype(np.float64)
    sol = np.linalg.lstsq(X1, y.numpy().astype(np.float64), rcond=None)[0]
    assert np.allclose(fit.weight.numpy(), sol[:-1], atol=1e-8)
    assert np.allclose(fit.bias.numpy(), sol[-1], atol=1e-8)


def test_r2_and_pearson_basics():
    y = torch.randn(1000, 2, generator=torch.Generator().manual_seed(4))
    assert r2_score(y, y) == pytest.approx(1.0)
    assert r2_score(y, torch.zeros_like(y) + y.mean(0)) == pytest.approx(0.0, abs=1e-9)
    assert pearson_r(y[:, 0], 2 * y[:, 0] + 1) == pytest.approx(1.0)


def test_head_r2_recovers_linear_rows():
    v = sphere(100, 5, 5)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(6)))
    assert head_r2(v @ Q, v) == pytest.approx(1.0, abs=1e-9)
    assert head_r2(torch.randn(100, 5, generator=torch.Generator().manual_seed(7)), v) < 0.5


class _Oracle(torch.nn.Module):
    """f = g^{-1} followed by an orthogonal map: the ideal encoder of case C1."""

    def __init__(self, dgp, Q):
        super().__init__()
        self.dgp, self.Q = dgp, Q

    def forward(self, x):
        return self.dgp.g.inverse(x) @ self.Q


def test_synthetic_figures_of_an_ideal_encoder():
    cfg = load_config("synthetic-diet", ["data.generator_pool=500", "probe.samples=4096"])
    dgp = SyntheticDGP(cfg.data, cfg.data_seed)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(8)))
    model = Classifier(_Oracle(dgp, Q), 5, dgp.num_outputs, unit_features=True, unit_weights=True,
                       temperature=10.0, learn_temperature=False)
    with torch.no_grad():
        model.head.copy_(dgp.head_targets() @ Q)
    figs = synthetic_figures(model, cfg, dgp)
    assert figs["probe/r2_affine"] > 0.9999 and figs["probe/r2_linear"] > 0.9999
    assert figs["probe/sv_mae"] < 1e-4 and figs["probe/r2_w"] > 0.9999
    assert figs["probe/r2_g"] < figs["probe/r2_affine"]
    # an untrained encoder is far from it
    untrained = build_classifier(cfg, InputSpec(dim=5), dgp.num_outputs)
    assert synthetic_figures(untrained, cfg, dgp)["probe/r2_w"] < 0.5
