"""Encoders f and the classifier head W. No distribution code here (that is engine.py's job).

Encoders come from a registry (`register_encoder` / `create_encoder`, timm style); any name not in
the registry is looked up in timm. The classifier is f followed by a bias-free head W whose
logits are β <w_j, f(x)>, with the four normalisation cases of Theorem 1 (unit-norm f(x) and/or
unit-norm rows of W) and a fixed or learned temperature β.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import Config, ModelConfig
from trainer.errors import UserError


@dataclass(frozen=True)
class InputSpec:
    """What the encoder sees: flat vectors of `dim` (synthetic) or images [channels, size, size]."""

    dim: int | None = None
    channels: int | None = None
    size: int | None = None


_ENCODERS: dict[str, Callable[[ModelConfig, InputSpec], tuple[nn.Module, int]]] = {}


def register_encoder(name: str):
    def deco(fn):
        _ENCODERS[name] = fn
        return fn
    return deco


def list_encoders() -> list[str]:
    return sorted(_ENCODERS)


def mlp(widths: list[int], activation: Callable[[], nn.Module]) -> nn.Sequential:
    """Linear-BatchNorm-activation blocks over consecutive widths (no block after the last width)."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.BatchNorm1d(w_out), activation()]
    return nn.Sequential(*layers)


@register_encoder("synthetic_mlp")
def synthetic_mlp(cfg: ModelConfig, spec: InputSpec) -> tuple[nn.Module, int]:
    """The paper's synthetic encoder: BatchNorm MLP with hidden widths [10d, 50d, 50d, 50d, 50d, 10d]."""
    d = spec.dim
    if d is None:
        raise UserError("model.encoder=synthetic_mlp takes flat inputs (data.dataset=synthetic)")
    hidden = cfg.hidden or [10 * d, 50 * d, 50 * d, 50 * d, 50 * d, 10 * d]
    out = cfg.feature_dim or d
    body = mlp([d, *hidden], lambda: nn.LeakyReLU(0.2))
    return nn.Sequential(body, nn.Linear(hidden[-1], out)), out


@register_encoder("dislib_mlp")
def dislib_mlp(cfg: ModelConfig, spec: InputSpec) -> tuple[nn.Module, int]:
    """The paper's DisLib MLP: flattened pixels -> three 512-unit Linear-BatchNorm-ReLU layers."""
    if spec.channels is None:
        raise UserError("model.encoder=dislib_mlp takes images (an image data.dataset)")
    hidden = cfg.hidden or [512, 512, 512]
    in_dim = spec.channels * spec.size * spec.size
    return nn.Sequential(nn.Flatten(), mlp([in_dim, *hidden], nn.ReLU)), hidden[-1]


def timm_encoder(name: str, cfg: ModelConfig, spec: InputSpec) -> tuple[nn.Module, int]:
    """A timm backbone with the classifier removed (num_classes=0) and in_chans set to the data's."""
    import timm

    if spec.channels is None:
        raise UserError(f"model.encoder={name} takes images (an image data.dataset)")
    if not timm.is_model(name):
        raise UserError(f"model.encoder={name}: not a linrep encoder ({', '.join(list_encoders())}) "
                        "nor a timm model name")
    kwargs = dict(pretrained=cfg.pretrained, num_classes=0, in_chans=spec.channels, drop_rate=cfg.drop_rate)
    if cfg.drop_path_rate:  # only when asked: not every timm model takes drop_path_rate
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if "vit" in name or "deit" in name:
        kwargs["img_size"] = spec.size
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as err:  # timm raises many kinds (missing weights offline, bad kwargs)
        raise UserError(f"model.encoder={name}: timm could not build it ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0][:120]})") from None
    return model, model.num_features


@register_encoder("resnet18")
def resnet18(cfg: ModelConfig, spec: InputSpec) -> tuple[nn.Module, int]:
    """timm ResNet-18 with the first conv adapted to the channel count, classifier removed (512-d)."""
    return timm_encoder("resnet18", cfg, spec)


def create_encoder(cfg: ModelConfig, spec: InputSpec) -> tuple[nn.Module, int]:
    """Registered encoder or any timm model by name -> (module, feature dimension)."""
    if cfg.encoder in _ENCODERS:
        return _ENCODERS[cfg.encoder](cfg, spec)
    return timm_encoder(cfg.encoder, cfg, spec)


class Classifier(nn.Module):
    """f followed by a bias-free head W: logits = β <w_j, f(x)> (with optional unit norms)."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_outputs: int, *, unit_features: bool,
                 unit_weights: bool, temperature: float, learn_temperature: bool):
        super().__init__()
        self.encoder = encoder
        self.unit_features = unit_features
        self.unit_weights = unit_weights
        self.head = nn.Parameter(torch.randn(num_outputs, feature_dim) / math.sqrt(feature_dim))  # W: [K, p]
        log_beta = torch.tensor(math.log(temperature))
        if learn_temperature:
            # shape [1], not a scalar: DeepSpeed broadcasts every parameter as bytes at start-up
            # (p.data.view(torch.uint8)), which a 0-d tensor refuses ("self.dim() cannot be 0")
            self.log_beta = nn.Parameter(log_beta.reshape(1))
        else:
            self.register_buffer("log_beta", log_beta)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "log_beta"  # a learned β saved as a scalar (before the [1] shape) loads as [1]
        if key in state_dict and state_dict[key].numel() == 1 and state_dict[key].shape != self.log_beta.shape:
            state_dict[key] = state_dict[key].reshape(self.log_beta.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def no_weight_decay(self) -> set[str]:
        """Parameters timm's optimiser factory keeps out of weight decay besides biases and norms (it
        reads this method): the temperature, and what the encoder lists (a ViT's pos_embed, cls_token)."""
        inner = getattr(self.encoder, "no_weight_decay", None)
        return {"log_beta", *(f"encoder.{name}" for name in (inner() if callable(inner) else ()))}

    @property
    def temperature(self) -> float:
        return float(self.log_beta.detach().exp())  # float() of a tensor that requires grad warns

    def features(self, x: Tensor) -> Tensor:
        """f(x) [B, p], unit-norm in cases C1/C2."""
        f = self.encoder(x)
        return F.normalize(f, dim=-1) if self.unit_features else f

    def head_weights(self) -> Tensor:
        """W [K, p], rows unit-norm in cases C1/C3."""
        return F.normalize(self.head, dim=-1) if self.unit_weights else self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.log_beta.exp() * self.features(x) @ self.head_weights().T  # [B, K]


def build_classifier(cfg: Config, spec: InputSpec, num_outputs: int) -> Classifier:
    encoder, feature_dim = create_encoder(cfg.model, spec)
    return Classifier(encoder, feature_dim, num_outputs, unit_features=cfg.unit_features,
                      unit_weights=cfg.unit_weights, temperature=cfg.model.temperature,
                      learn_temperature=cfg.model.learn_temperature)
