"""The paper's synthetic data-generating process (section 4.1), sampled on the training device.

z lives on the unit sphere S^{d-1}; each class c has a unit cluster vector v_c; a sample's latent is
drawn from a class-conditional around v_c (vMF(κ) exactly by Wood's algorithm, or Laplace/Normal in
R^d projected back to the sphere); the observation is x = g(z) for an invertible leaky-ReLU MLP g.
Every random draw takes an explicit torch.Generator, so (seed, rank, step) fixes a batch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import DataConfig

LEAKY_SLOPE = 0.2


def make_generator(seed_parts: list[int], device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded by a tuple of ints (e.g. [seed, rank, step]) without collisions."""
    state = np.random.SeedSequence([int(s) & 0xFFFFFFFF for s in seed_parts]).generate_state(2, np.uint64)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0] >> np.uint64(1)))
    return gen


def uniform_sphere(n: int, d: int, gen: torch.Generator, device=None, dtype=torch.float32) -> Tensor:
    """n points uniform on S^{d-1}: [n, d]."""
    return F.normalize(torch.randn(n, d, generator=gen, device=device, dtype=dtype), dim=-1)


def sample_vmf(mu: Tensor, kappa: float, gen: torch.Generator) -> Tensor:
    """Exact von Mises-Fisher samples around unit means mu [n, d] (Wood 1994), vectorised.

    w = <z, mu> is drawn by rejection from its marginal; the Beta((d-1)/2, (d-1)/2) proposal is
    built from chi-squares (ratios of squared normals) so that the torch.Generator controls it.
    """
    n, d = mu.shape
    m = d - 1
    b = m / (2 * kappa + np.sqrt(4 * kappa**2 + m**2))  # stable form of (-2κ + sqrt(4κ²+m²)) / m
    x0 = (1 - b) / (1 + b)
    c = kappa * x0 + m * np.log(1 - x0**2)
    w = torch.empty(n, device=mu.device, dtype=mu.dtype)
    todo = torch.arange(n, device=mu.device)
    while todo.numel():
        k = todo.numel()
        # oversample a little: acceptance is >= ~0.8 for all d, κ
        k_draw = int(k * 1.3) + 8
        a = torch.randn(k_draw, m, generator=gen, device=mu.device, dtype=mu.dtype).pow(2).sum(1)
        bb = torch.randn(k_draw, m, generator=gen, device=mu.device, dtype=mu.dtype).pow(2).sum(1)
        beta = a / (a + bb)
        u = torch.rand(k_draw, generator=gen, device=mu.device, dtype=mu.dtype)
        w_prop = (1 - (1 + b) * beta) / (1 - (1 - b) * beta)
        ok = kappa * w_prop + m * torch.log(1 - x0 * w_prop) - c >= torch.log(u)
        accepted = w_prop[ok][:k]
        w[todo[: accepted.numel()]] = accepted
        todo = todo[accepted.numel():]
    # direction orthogonal to mu, uniform on the tangent sphere
    v = torch.randn(n, d, generator=gen, device=mu.device, dtype=mu.dtype)
    v = F.normalize(v - (v * mu).sum(-1, keepdim=True) * mu, dim=-1)
    return w.unsqueeze(-1) * mu + torch.sqrt(torch.clamp(1 - w**2, min=0)).unsqueeze(-1) * v


def sample_laplace(shape, scale: float, gen: torch.Generator, device=None, dtype=torch.float32) -> Tensor:
    u = torch.rand(shape, generator=gen, device=device, dtype=dtype) - 0.5
    return -scale * torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 1e-7))


def sample_conditional(mu: Tensor, data: DataConfig, gen: torch.Generator) -> Tensor:
    """z | c around cluster vectors mu [n, d], by data.conditional."""
    if data.conditional == "vmf":
        return sample_vmf(mu, data.kappa, gen)
    if data.conditional == "laplace":
        noise = sample_laplace(mu.shape, data.conditional_scale, gen, mu.device, mu.dtype)
    else:  # normal with variance σ²
        noise = np.sqrt(data.conditional_scale) * torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
    return F.normalize(mu + noise, dim=-1)


def sample_cluster_vectors(data: DataConfig, gen: torch.Generator, device=None) -> Tensor:
    """|C| unit cluster vectors [C, d]: uniform on the sphere, or Laplace/Normal around e1, projected."""
    C, d = data.num_classes, data.dim
    if data.cluster_marginal == "uniform":
        return uniform_sphere(C, d, gen, device)
    e1 = torch.zeros(C, d, device=device)
    e1[:, 0] = 1
    if data.cluster_marginal == "laplace":
        noise = sample_laplace((C, d), data.marginal_scale, gen, device)
    else:
        noise = data.marginal_scale * torch.randn(C, d, generator=gen, device=device)
    return F.normalize(e1 + noise, dim=-1)


def best_conditioned_matrices(d: int, layers: int, pool: int, gen: torch.Generator) -> Tensor:
    """For each layer, the best-conditioned of `pool` uniform(-1,1) column-normalised d×d matrices.

    Vectorised: one batched SVD over the whole pool ([layers*pool, d, d]).
    """
    cand = torch.rand(layers, pool, d, d, generator=gen, dtype=torch.float64) * 2 - 1
    cand = cand / cand.norm(dim=-2, keepdim=True)  # L2-normalise columns
    s = torch.linalg.svdvals(cand)  # [layers, pool, d], descending
    cond = s[..., 0] / s[..., -1]
    best = cond.argmin(dim=1)
    return cand[torch.arange(layers), best].float()  # [layers, d, d]


class InvertibleMLP(nn.Module):
    """g: R^d -> R^d, square layers with leaky-ReLU (slope 0.2) between them; exactly invertible."""

    def __init__(self, weights: Tensor):
        super().__init__()
        self.register_buffer("weights", weights)  # [layers, d, d]

    def forward(self, z: Tensor) -> Tensor:
        x = z
        for i, w in enumerate(self.weights):
            x = x @ w.T
            if i < len(self.weights) - 1:
                x = F.leaky_relu(x, LEAKY_SLOPE)
        return x

    def inverse(self, x: Tensor) -> Tensor:
        z = x
        for i in reversed(range(len(self.weights))):
            if i < len(self.weights) - 1:
                z = torch.where(z >= 0, z, z / LEAKY_SLOPE)
            z = torch.linalg.solve(self.weights[i].double(), z.double().T).T.to(x.dtype)
        return z

    def condition_numbers(self) -> Tensor:
        s = torch.linalg.svdvals(self.weights.double())
        return s[:, 0] / s[:, -1]


@dataclass
class SyntheticBatch:
    x: Tensor        # [n, d] observations g(z)
    z: Tensor        # [n, d] latents on the sphere
    cls: Tensor      # [n] class index
    instance: Tensor  # [n] instance label (== cls for supervised data)
    target: Tensor   # [n] the label the model is trained on (class or instance)


class SyntheticDGP:
    """The DGP fixed by (data config, data seed): cluster vectors and g; sample(n, gen) draws batches."""

    def __init__(self, data: DataConfig, seed: int, device: torch.device | str = "cpu"):
        self.cfg = data
        self.device = torch.device(device)
        gen = make_generator([seed, 0xD6F])
        self.cluster_vectors = sample_cluster_vectors(data, gen).to(self.device)  # [C, d]
        weights = best_conditioned_matrices(data.dim, data.generator_layers, data.generator_pool, gen)
        self.g = InvertibleMLP(weights).to(self.device)

    @property
    def num_outputs(self) -> int:
        """Rows of the head W: |C| for supervised, N for DIET."""
        return self.cfg.num_instances if self.cfg.labels == "instance" else self.cfg.num_classes

    def instance_class(self, instance: Tensor) -> Tensor:
        """Instance i belongs to class i mod |C| (the public code's convention)."""
        return instance % self.cfg.num_classes

    def head_targets(self) -> Tensor:
        """Cluster vector of each row of W: [num_outputs, d]."""
        rows = torch.arange(self.num_outputs, device=self.device)
        return self.cluster_vectors[self.instance_class(rows)]

    @torch.no_grad()
    def sample(self, n: int, gen: torch.Generator) -> SyntheticBatch:
        d = self.device
        if self.cfg.labels == "instance":
            instance = torch.randint(self.cfg.num_instances, (n,), generator=gen, device=d)
            cls = self.instance_class(instance)
            target = instance
        else:
            cls = torch.randint(self.cfg.num_classes, (n,), generator=gen, device=d)
            instance = target = cls
        z = sample_conditional(self.cluster_vectors[cls], self.cfg, gen)
        return SyntheticBatch(x=self.g(z), z=z, cls=cls, instance=instance, target=target)
