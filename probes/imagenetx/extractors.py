"""Feature extractors of the ImageNet-X probe, a registry by kind.

``checkpoint`` (a linrep checkpoint's encoder), ``timm`` (pretrained), ``timm_random`` (the same
architecture at random init) and ``pixels`` (a fixed random projection); a model is named by a
spec string ``kind[:arg][,key=value...]`` (see ModelSpec).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from trainer.errors import UserError


@dataclass
class Extractor:
    """Turns a batch of images [B, 3, H, W] (already transformed) into features [B, p]."""

    label: str  # short, MLflow-safe name used in tables and metric keys
    features: Callable[[Tensor], Tensor]
    transform: Callable  # PIL image -> float tensor [3, H, W]
    device: torch.device = torch.device("cpu")


@dataclass(frozen=True)
class ModelSpec:
    """``kind[:arg][,key=value...]``, e.g. ``timm:resnet50``, ``timm_random:vit_base_patch16_224``,
    ``pixels:2048,size=224,seed=0``, ``checkpoint:/runs/x/checkpoint_000010,label=ours``."""

    kind: str
    arg: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str, default: str | None = None) -> str | None:
        return dict(self.options).get(name, default)

    @property
    def label(self) -> str:
        given = self.option("label")
        if given:
            return safe_label(given)
        if self.kind == "timm":
            return safe_label(self.arg)
        if self.kind == "timm_random":
            return safe_label(f"{self.arg}-random")
        if self.kind == "pixels":
            return safe_label(f"pixels-{self.arg or 2048}")
        return safe_label(f"{self.kind}-{Path(self.arg).name or self.arg}")


def safe_label(text: str) -> str:
    """MLflow metric keys allow letters, digits, _ - . / and spaces: keep a tidy subset."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def parse_model_spec(text: str) -> ModelSpec:
    head, *opts = [part.strip() for part in str(text).split(",")]
    kind, _, arg = head.partition(":")
    if kind not in _EXTRACTORS:
        raise UserError(f"model spec '{text}': unknown kind '{kind}' (kinds: {', '.join(sorted(_EXTRACTORS))})")
    options = []
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise UserError(f"model spec '{text}': option '{opt}' is not key=value")
        options.append((key.strip(), value.strip()))
    return ModelSpec(kind, arg.strip(), tuple(options))


_EXTRACTORS: dict[str, Callable[[ModelSpec, torch.device, int], Extractor]] = {}


def register_extractor(kind: str):
    """Decorator: a factory (spec, device, seed) -> Extractor under this kind."""
    def deco(fn):
        _EXTRACTORS[kind] = fn
        return fn
    return deco


def list_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def create_extractor(spec: str | ModelSpec, device: str | torch.device = "cpu", seed: int = 0) -> Extractor:
    """The registered extractor for a model spec (see ModelSpec), in eval mode on `device`."""
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    return _EXTRACTORS[spec.kind](spec, torch.device(device), seed)


def _frozen(module: torch.nn.Module, device: torch.device) -> Callable[[Tensor], Tensor]:
    module = module.to(device).eval()

    @torch.no_grad()
    def features(images: Tensor) -> Tensor:
        out = module(images.to(device))
        return out.flatten(1) if out.dim() > 2 else out
    return features


def load_weights_file(path: Path | str) -> dict[str, Tensor]:
    """A state dict from a local weights file without running anything in it: ``.safetensors``
    through safetensors (preferred: no pickle at all), anything else through torch.load
    (weights_only=True; trainer.safe_load), which refuses a pickle that asks for code. A
    {"state_dict": ...} or {"model": ...} wrapper and a "module." prefix are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist (nothing is downloaded: give a local file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"weights file {path} is not a readable safetensors file ({str(err)[:120]})") from None
    else:
        from trainer.safe_load import load_file

        try:
            state = load_file(path)
        except UserError:
            raise
        except Exception as err:  # not a torch file at all: zip, EOF and unpickling errors of many types
            raise UserError(f"weights file {path} is not a torch weights file ({err.__class__.__name__})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_local_weights(model: torch.nn.Module, name: str, path: str) -> torch.nn.Module:
    """The weights of an ImageNet-1k classifier `name` (its 1000-way head included) into `model`,
    strictly, then the head removed: a file of another architecture or head size is refused."""
    state = load_weights_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[1:2] or [str(err)[:160]]
        raise UserError(f"weights file {path} does not fit timm's {name} with a 1000-class head "
                        f"({first[0].strip()[:200]}); give ImageNet-1k weights of exactly this architecture") from None
    model.reset_classifier(0)
    return model


def _timm_model(spec: ModelSpec, pretrained: bool, seed: int):
    import timm

    if not spec.arg:
        raise UserError(f"model spec {spec.kind}: name a timm model, e.g. {spec.kind}:resnet50")
    if spec.arg not in timm.list_models() and not timm.is_model(spec.arg):
        raise UserError(f"timm has no model '{spec.arg}' (see timm.list_models())")
    weights = spec.option("file")
    torch.manual_seed(seed)  # the random-init baseline is reproducible
    if weights and pretrained:
        # Our own loader, not timm's pretrained_cfg_overlay: the file is read weights-only (see load_weights_file).
        load_weights_file(weights)  # refuse a bad file before building a large model
        return _load_local_weights(timm.create_model(spec.arg, pretrained=False), spec.arg, weights)
    try:
        return timm.create_model(spec.arg, pretrained=pretrained, num_classes=0)
    except Exception as err:  # hub/network/file errors come in many types
        if not pretrained:
            raise
        raise UserError(f"timm model '{spec.arg}': pretrained weights cannot be loaded on this machine "
                        f"({err.__class__.__name__}); put them in the Hugging Face cache or pass "
                        f"{spec.kind}:{spec.arg},file=/path/to/weights") from None


def _timm_extractor(spec: ModelSpec, device: torch.device, seed: int, pretrained: bool) -> Extractor:
    import timm.data

    model = _timm_model(spec, pretrained, seed)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    return Extractor(spec.label, _frozen(model, device), transform, device)


@register_extractor("timm")
def timm_pretrained(spec: ModelSpec, device: torch.device, seed: int) -> Extractor:
    """A timm model with its pretrained weights, classifier removed (pooled features)."""
    return _timm_extractor(spec, device, seed, pretrained=True)


@register_extractor("timm_random")
def timm_random(spec: ModelSpec, device: torch.device, seed: int) -> Extractor:
    """The same timm architecture at (seeded) random initialisation."""
    return _timm_extractor(spec, device, seed, pretrained=False)


@register_extractor("pixels")
def pixel_projection(spec: ModelSpec, device: torch.device, seed: int) -> Extractor:
    """A fixed Gaussian random projection of the flattened, normalised pixels to `dim` features."""
    from trainer.data.imagenet import imagenet_eval_transform

    dim = int(spec.arg or 2048)
    size = int(spec.option("size", "224"))
    seed = int(spec.option("seed", str(seed)))
    generator = torch.Generator().manual_seed(seed)
    inputs = 3 * size * size
    # N(0, 1/inputs): features of unit scale; drawn on the CPU so every device gets the same matrix.
    projection = (torch.randn(inputs, dim, generator=generator) / math.sqrt(inputs)).to(device)

    @torch.no_grad()
    def features(images: Tensor) -> Tensor:
        return images.to(device).flatten(1) @ projection
    return Extractor(spec.label, features, imagenet_eval_transform(size), device)


@register_extractor("checkpoint")
def checkpoint_encoder(spec: ModelSpec, device: torch.device, seed: int) -> Extractor:
    """The encoder f of a linrep checkpoint, fed images as its validation loader feeds them."""
    from trainer.data.imagenet import imagenet_eval_transform

    try:
        from trainer.checkpoint import load_encoder
    except ImportError as err:
        raise UserError(f"checkpoint models need trainer.checkpoint.load_encoder ({err})") from None
    if not spec.arg:
        raise UserError("model spec checkpoint: give the checkpoint folder, e.g. checkpoint:/runs/x/checkpoint_000010")
    encoder, cfg = load_encoder(Path(spec.arg), device)
    return Extractor(spec.label, _frozen(encoder, device), imagenet_eval_transform(cfg.data.image_size), device)
