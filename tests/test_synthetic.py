"""The synthetic DGP: exact vMF, projected conditionals, cluster marginals, an invertible g."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy.special import ive

from trainer.config import DataConfig
from trainer.data.synthetic import (SyntheticDGP, best_conditioned_matrices, make_generator, sample_conditional,
                                    sample_vmf)


def mean_resultant_length(d: int, kappa: float) -> float:
    """A_d(κ) = I_{d/2}(κ) / I_{d/2-1}(κ) (exponentially scaled Bessels: stable for large κ)."""
    return ive(d / 2, kappa) / ive(d / 2 - 1, kappa)


@pytest.mark.parametrize("d,kappa", [(3, 1.0), (5, 10.0), (10, 50.0), (20, 5.0), (5, 200.0)])
def test_vmf_mean_resultant_length(d, kappa):
    mu = torch.nn.functional.normalize(torch.randn(1, d, generator=torch.Generator().manual_seed(1)), dim=-1)
    z = sample_vmf(mu.expand(400_000, d).contiguous(), kappa, make_generator([d, int(kappa)]))
    assert torch.allclose(z.norm(dim=-1), torch.ones(len(z)), atol=1e-5)
    measured = float((z @ mu.T).mean())
    assert measured == pytest.approx(mean_resultant_length(d, kappa), rel=0.01)
    # the component orthogonal to mu has no preferred direction
    ortho = z - (z @ mu.T) * mu
    assert ortho.mean(0).abs().max() < 0.01


@pytest.mark.parametrize("conditional", ["laplace", "normal"])
def test_projected_conditionals_lie_on_the_sphere_and_centre_on_mu(conditional):
    data = DataConfig(conditional=conditional, conditional_scale=0.5)
    mu = torch.zeros(50_000, 5)
    mu[:, 0] = 1
    z = sample_conditional(mu, data, make_generator([3]))
    assert torch.allclose(z.norm(dim=-1), torch.ones(len(z)), atol=1e-5)
    assert z[:, 0].mean() > 0.5 and z[:, 1:].mean(0).abs().max() < 0.02


@pytest.mark.parametrize("marginal", ["uniform", "laplace", "normal"])
def test_cluster_marginals(marginal):
    dgp = SyntheticDGP(DataConfig(cluster_marginal=marginal, num_classes=2000, generator_pool=100), seed=0)
    v = dgp.cluster_vectors
    assert torch.allclose(v.norm(dim=-1), torch.ones(len(v)), atol=1e-5)
    e1_mean = float(v[:, 0].mean())
    if marginal == "uniform":
        assert abs(e1_mean) < 0.1
    else:
        assert e1_mean > 0.3  # concentrated around e1


def test_generator_is_well_conditioned_and_invertible():
    t0 = time.perf_counter()
    dgp = SyntheticDGP(DataConfig(dim=10, generator_pool=10_000), seed=0)
    assert time.perf_counter() - t0 < 60  # vectorised selection: seconds, not minutes
    cond = dgp.g.condition_numbers()
    assert (cond < 6).all()
    # best of the pool is much better than a typical random draw
    typical = best_conditioned_matrices(10, 1, 1, torch.Generator().manual_seed(5))
    s = torch.linalg.svdvals(typical.double())
    assert cond.max() <= (s[..., 0] / s[..., -1]).max() or cond.max() < 3
    b = dgp.sample(4096, make_generator([1]))
    assert torch.allclose(dgp.g.inverse(b.x), b.z, atol=1e-4)
    # g is genuinely nonlinear: an affine map from x recovers z only partly
    from probes.linear import heldout_r2
    assert heldout_r2(b.x, b.z)[0] < 0.99


def test_same_seed_same_data_and_instance_labels():
    data = DataConfig(labels="instance", num_instances=300, num_classes=30, generator_pool=100)
    a = SyntheticDGP(data, seed=7).sample(512, make_generator([7, 0, 3]))
    b = SyntheticDGP(data, seed=7).sample(512, make_generator([7, 0, 3]))
    c = SyntheticDGP(data, seed=8).sample(512, make_generator([8, 0, 3]))
    assert torch.equal(a.x, b.x) and torch.equal(a.target, b.target)
    assert not torch.equal(a.x, c.x)
    assert torch.equal(a.cls, a.instance % 30)
    assert int(a.target.max()) < 300


def public_marginal_reference(marginal: str, n: int, d: int, seed: int) -> np.ndarray:
    """The public code's cluster-vector marginals (simulation/main_diet.py `--m-p 1/2`, spaces.NSphereSpace):
    e1 plus Laplace(0, 1) or Normal(0, 1) noise in every coordinate, projected to the sphere; numpy, so
    it shares nothing with the sampler under test."""
    rng = np.random.default_rng(seed)
    noise = rng.laplace(0.0, 1.0, (n, d)) if marginal == "laplace" else rng.normal(0.0, 1.0, (n, d))
    x = noise
    x[:, 0] += 1.0
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def marginal_statistics(v: np.ndarray) -> np.ndarray:
    """E[v1], E[v1²], E[|v2|], P(v1 > 0.9): they separate uniform, Laplace and Normal around e1."""
    return np.array([v[:, 0].mean(), (v[:, 0] ** 2).mean(), np.abs(v[:, 1]).mean(), (v[:, 0] > 0.9).mean()])


@pytest.mark.parametrize("marginal", ["laplace", "normal"])
def test_cluster_marginal_matches_the_public_definition(marginal):
    """200,000 draws of the sampler against a numpy draw of the public code's definition: every statistic
    within 6 standard errors of their difference (each statistic's sd <= 0.5: 6 * 0.5 * sqrt(2/200k) = 0.0095),
    and clearly apart from the other marginal's."""
    from trainer.data.synthetic import sample_cluster_vectors

    n, d = 200_000, 5
    data = DataConfig(cluster_marginal=marginal, num_classes=n, dim=d)
    ours = marginal_statistics(sample_cluster_vectors(data, make_generator([7])).double().numpy())
    ref = marginal_statistics(public_marginal_reference(marginal, n, d, seed=8))
    other = marginal_statistics(public_marginal_reference("normal" if marginal == "laplace" else "laplace", n, d, 9))
    assert np.abs(ours - ref).max() < 0.0095, (ours, ref)
    assert np.abs(ours - other).max() > 0.03, (ours, other)


def test_uniform_cluster_marginal_has_the_sphere_moments():
    """Uniform on S^{d-1}: E[v_i] = 0 and E[v_i²] = 1/d for every coordinate (200,000 draws, 6 s.e.)."""
    from trainer.data.synthetic import sample_cluster_vectors

    n, d = 200_000, 5
    v = sample_cluster_vectors(DataConfig(num_classes=n, dim=d), make_generator([3])).double().numpy()
    assert np.abs(v.mean(0)).max() < 6 * np.sqrt(1 / d / n)
    assert np.abs((v ** 2).mean(0) - 1 / d).max() < 6 * 0.2 / np.sqrt(n)
