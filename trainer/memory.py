"""A lower bound on the memory one process of a run needs, checked before anything starts.

`data.num_classes=10000000000` used to pass validation, fail to allocate inside a Ray worker, print
its traceback and be retried run.max_failures times. `check_memory(cfg)` (called by the config's
cross-checks, so before Ray starts) adds up what a training worker and the probe actor allocate
for certain and refuses, in one line naming the key to lower, what this machine cannot hold:

    data.num_classes=10000000000: a training worker would need ~77225.3 GiB (a step's logits and
    their gradient [1024 x 10000000000]), this machine has 20.6 GiB available; lower data.num_classes

Every term is a floor, not a guess: tensors whose shape the config fixes (head, encoder weights
of the MLP encoders, the synthetic DGP's cluster vectors and generator candidates, one step's
inputs, activations and logits, the probe's held-out sample), in float32 unless the code builds
them in float64. Whatever the config does not fix (a timm backbone's activations, the size of an
image dataset) counts as nothing, so a config refused here cannot fit; one that passes may still
not. A worker is sized on its own (its share of optim.batch_size): on a cluster the workers sit on
other machines, but none can hold less than one of them needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from trainer.config import Config

GIB = 2**30
F32, F64 = 4, 8
# widths of the encoders whose feature dimension the config does not state (a lower bound of 1 otherwise)
KNOWN_FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048, "vit_base_patch16_224": 768}
IMAGENET_CLASSES = {"1000": 1000, "100": 100, "binary": 2}


@dataclass(frozen=True)
class Need:
    """`nbytes` that `what` takes for certain; `key` is the config key that sizes it."""

    key: str
    nbytes: int
    what: str


# ---- shapes the config fixes ---------------------------------------------------------------------
def num_outputs(cfg: Config) -> int:
    """Rows of the head W (a floor where only the data knows: a factor's number of values)."""
    d = cfg.data
    if cfg.is_synthetic:
        return d.num_instances if d.labels == "instance" else d.num_classes
    if d.dataset == "imagenet":
        return IMAGENET_CLASSES[d.granularity]
    return d.num_classes if d.labels == "partition" else 2


def outputs_key(cfg: Config) -> str:
    return "data.num_instances" if cfg.is_synthetic and cfg.data.labels == "instance" else "data.num_classes"


def input_size(cfg: Config) -> int:
    """Numbers per input sample: d for the synthetic DGP, one channel of image_size² for images."""
    return cfg.data.dim if cfg.is_synthetic else cfg.data.image_size ** 2


def encoder_widths(cfg: Config) -> list[int] | None:
    """Layer widths of the MLP encoders, input first (None for backbones the config does not size)."""
    m, d = cfg.model, cfg.data
    if m.encoder == "synthetic_mlp":
        hidden = m.hidden or [10 * d.dim, 50 * d.dim, 50 * d.dim, 50 * d.dim, 50 * d.dim, 10 * d.dim]
        return [d.dim, *hidden, d.dim]
    if m.encoder == "dislib_mlp":
        return [input_size(cfg), *(m.hidden or [512, 512, 512])]
    return None


def feature_dim(cfg: Config) -> int:
    if cfg.is_synthetic:
        return cfg.data.dim
    widths = encoder_widths(cfg)
    return cfg.model.feature_dim or (widths[-1] if widths else KNOWN_FEATURE_DIMS.get(cfg.model.encoder, 1))


def copies_while_training(cfg: Config) -> int:
    """Each trained weight is held with its gradient and the optimiser's state (Adam: two moments)."""
    states = {"adam": 2, "adamw": 2, "sgd": 1 if cfg.optim.momentum > 0 else 0}[cfg.optim.name]
    return 2 + states


def widths_key(cfg: Config) -> str:
    return "model.hidden" if cfg.model.hidden else ("data.dim" if cfg.is_synthetic else "data.image_size")


# ---- the needs of one process --------------------------------------------------------------------
def synthetic_dgp_needs(cfg: Config) -> list[Need]:
    """The DGP every worker and the probe actor build: cluster vectors and g's candidate matrices."""
    if not cfg.is_synthetic:
        return []
    d = cfg.data
    # candidates are drawn in float64 ([layers, pool, d, d]) and normalised into a second tensor
    candidates = 2 * d.generator_layers * d.generator_pool * d.dim ** 2 * F64
    pool_key = "data.generator_pool" if d.generator_pool * d.generator_layers > d.dim ** 2 else "data.dim"
    return [Need("data.num_classes", d.num_classes * d.dim * F32, f"cluster vectors [{d.num_classes} x {d.dim}]"),
            Need(pool_key, candidates, f"generator candidates [{d.generator_layers} x {d.generator_pool} x "
                                       f"{d.dim} x {d.dim}] in float64")]


def weight_needs(cfg: Config, copies: int) -> list[Need]:
    """The head W and the MLP encoder's weights, `copies` times each (weights, gradients, state)."""
    rows, cols = num_outputs(cfg), feature_dim(cfg)
    held = "with gradients and optimiser state" if copies > 1 else "weights only"
    needs = [Need(outputs_key(cfg), rows * cols * F32 * copies, f"classifier head W [{rows} x {cols}], {held}")]
    widths = encoder_widths(cfg)
    if widths:
        weights = sum(a * b for a, b in zip(widths, widths[1:]))
        needs.append(Need(widths_key(cfg), weights * F32 * copies, f"encoder weights ({weights} numbers), {held}"))
    return needs


def step_needs(cfg: Config) -> list[Need]:
    """One step's batch on a worker: inputs, the MLP's activations, the logits and their gradient."""
    per_worker = cfg.optim.batch_size // cfg.run.workers
    rows = num_outputs(cfg)
    widths = encoder_widths(cfg) or [input_size(cfg)]
    logits_key = "optim.batch_size" if per_worker >= rows else outputs_key(cfg)
    return [Need("optim.batch_size", per_worker * sum(widths) * F32,
                 f"a step's inputs and activations ({per_worker} samples)"),
            Need(logits_key, 2 * per_worker * rows * F32, f"a step's logits and their gradient [{per_worker} x {rows}]")]


def worker_needs(cfg: Config) -> list[Need]:
    """What one Ray Train worker holds. With a GPU the step's tensors live on the device, not here."""
    needs = synthetic_dgp_needs(cfg) + weight_needs(cfg, copies_while_training(cfg))
    return needs if cfg.run.use_gpu else needs + step_needs(cfg)


def probe_needs(cfg: Config) -> list[Need]:
    """What the probe actor holds: the DGP, the model's weights and the held-out sample (z, x, f(x))."""
    if not cfg.probe.enabled:
        return []
    needs = synthetic_dgp_needs(cfg) + weight_needs(cfg, copies=1)
    if cfg.is_synthetic:
        n, d = cfg.probe.samples, cfg.data.dim
        needs.append(Need("probe.samples", n * (2 * d + feature_dim(cfg)) * F32,
                          f"the probe's held-out sample [{n} x (z, x, f(x))]"))
    return needs


# ---- the check -----------------------------------------------------------------------------------
def available_bytes() -> int:
    return int(psutil.virtual_memory().available)


def check_memory(cfg: Config, available: int | None = None) -> None:
    """ConfigError, one line, when a training worker or the probe actor cannot fit in this machine's
    available memory; it names the largest need and the key that sizes it."""
    from trainer.config import ConfigError

    available = available_bytes() if available is None else available
    for who, needs in (("a training worker", worker_needs(cfg)), ("the probe actor", probe_needs(cfg))):
        total = sum(n.nbytes for n in needs)
        if total <= available:
            continue
        top = max(needs, key=lambda n: n.nbytes)
        raise ConfigError(f"{top.key}={value_of(cfg, top.key)}: {who} would need ~{total / GIB:.1f} GiB "
                          f"({top.what}), this machine has {available / GIB:.1f} GiB available; lower {top.key}")


def value_of(cfg: Config, key: str):
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)
