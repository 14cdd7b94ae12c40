"""The one place that knows torch.distributed and DeepSpeed: build, step, save, load.

`setup_engine` wraps a plain nn.Module for the configured engine:
- "ddp": torch DistributedDataParallel (no wrapper on one worker) and a torch optimiser (Adam/AdamW
  fused into one kernel) with bf16 autocast when optim.precision=bf16. Light enough for the small
  synthetic MLPs, whose steps take milliseconds.
- "deepspeed": deepspeed.initialize with ZeRO stage 0/1/2, bf16 on GPU, gradient accumulation and
  clipping. It reuses the process group Ray Train set up.
Both expose forward / backward / step / save / load, so the training loop is engine-agnostic.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import OptimConfig, RunConfig
from trainer.errors import UserError
from trainer.safe_load import UnsafeCheckpointFile, load_file

MODEL_FILE = "model.pt"
EMA_FILE = "model_ema.pt"  # optim.ema_decay: the EMA weights (fp32), what probes read when present
STATE_FILE = "train_state.pt"
DS_TAG = "ds"


def make_optimizer(model_or_params, optim: OptimConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """The configured optimiser, by timm's factory (create_optimizer_v2).

    Given a module, timm splits its parameters into two groups: weight decay on the weights of
    linear/conv layers (and the head W), none on biases, norm layers, any other 1-d or 0-d
    parameter (the learned temperature log β) nor on the names the module lists in
    no_weight_decay() (a ViT's position embedding and class token; Classifier forwards its
    encoder's). sgd is timm's: Nesterov momentum. fused=True: Adam/AdamW's single-kernel update (CPU
    and CUDA), which for the small synthetic models is ~3x faster than the per-parameter loop
    (profiled: ~10 % of a CPU step). The update is the same arithmetic; only its grouping into
    kernels differs."""
    from timm.optim import create_optimizer_v2

    extra = {"fused": True} if fused and optim.name != "sgd" else {}
    return create_optimizer_v2(model_or_params, opt=optim.name, lr=optim.lr, weight_decay=optim.weight_decay,
                               momentum=optim.momentum, **extra)


class PerUpdateSchedule:
    """timm's scheduler stepped once per optimiser update (timm's step_update), behind the
    step() / state_dict() / load_state_dict() that DeepSpeed and the torch engine call."""

    def __init__(self, scheduler: Any):
        self.timm = scheduler
        self.updates = 0

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.updates += 1
        self.timm.step_update(self.updates)

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.timm.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a checkpoint written before the timm schedule holds LambdaLR's state: its last_epoch
        self.updates = int(state.get("updates", state.get("last_epoch", 0)))
        self.timm.step_update(self.updates)


def make_lr_schedule(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> PerUpdateSchedule:
    """timm's scheduler (create_scheduler_v2), per update: linear warm-up over optim.warmup_steps
    from lr/warmup_steps, then constant or a cosine to min_lr_ratio * lr over the remaining steps
    (warmup_prefix: the cosine starts where the warm-up ends). lr_factor is its closed form."""
    from timm.scheduler import create_scheduler_v2

    warmup = optim.warmup_steps
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=optim.schedule, num_epochs=max(1, optim.steps - warmup), warmup_epochs=warmup,
        warmup_prefix=True, warmup_lr=optim.lr / max(1, warmup), min_lr=optim.lr * optim.min_lr_ratio,
        step_on_epochs=False, updates_per_epoch=1)
    return PerUpdateSchedule(scheduler)


def make_ema(module: nn.Module, optim: OptimConfig):
    """timm's ModelEmaV3 of `module` in fp32 (a bf16 EMA cannot hold (1 - decay) * update), or None."""
    if optim.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(module, decay=optim.ema_decay, dtype=torch.float32)


def save_ema(ema, directory: Path) -> None:
    if ema is not None and world_rank() == 0:
        torch.save(ema.module.state_dict(), directory / EMA_FILE)


def load_ema(ema, directory: Path, module: nn.Module) -> None:
    """Resume the EMA; a checkpoint without one (EMA switched on later) starts it from the weights."""
    if ema is None:
        return
    if (directory / EMA_FILE).exists():
        device = next(ema.module.parameters()).device
        ema.module.load_state_dict(load_file(directory / EMA_FILE, map_location=device))
    else:
        ema.set(module)


def can_fuse(module: nn.Module, device: torch.device) -> bool:
    """Fused Adam needs floating-point parameters on CPU or CUDA (DeepSpeed keeps its own optimiser path)."""
    return device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in module.parameters())


def autocast_dtype(optim: OptimConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast for optim.precision=bf16 (fp32 master weights and optimiser state).

    "auto" stays fp32 in this engine: the synthetic MLPs it serves are launch-bound on GPUs, where
    autocast only adds cast kernels. The engine would autocast on any device, but bf16 is a GPU
    setting: trainer/config.py refuses optim.precision=bf16 without run.use_gpu (CPU training
    runs fp32).
    """
    return torch.bfloat16 if optim.precision == "bf16" else None


def lr_factor(step: int, optim: OptimConfig) -> float:
    """Multiplier of the peak lr at `step`, the closed form of make_lr_schedule (timm's): linear
    warm-up from 1/warmup_steps, then constant or cosine to min_lr_ratio."""
    if step < optim.warmup_steps:
        first = 1 / optim.warmup_steps
        return first + step * (1 - first) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, optim.steps - optim.warmup_steps)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_rank() -> int:
    return torch.distributed.get_rank() if _is_distributed() else 0


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's flag on every rank: all ranks must leave the training loop at the same step."""
    if not _is_distributed() or torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def wants_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Convolutional models on CUDA run NHWC: cuDNN's tensor-core kernels want it (the lent H200's
    ResNet-50 figures are in the README); elsewhere NCHW stays."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


class TorchEngine:
    """DDP (or a bare module on one worker) + torch optimiser + LambdaLR."""

    def __init__(self, model: nn.Module, optim: OptimConfig, device: torch.device, channels_last: bool = False):
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.module = model.to(device)
        self.device = device
        self.optim_cfg = optim
        self.wrapped = self.module
        if _is_distributed() and torch.distributed.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            # broadcast_buffers=False: DDP's default re-sends rank 0's BatchNorm statistics before every
            # forward, one more collective per step (14.9 -> 12.7 ms a step for the synthetic encoder on
            # 2 CPU processes). Each rank keeps its own running statistics instead; they only matter
            # in eval mode, and checkpoints hold rank 0's.
            self.wrapped = nn.parallel.DistributedDataParallel(self.module, device_ids=ids, broadcast_buffers=False)
        self.optimizer = make_optimizer(self.module, optim, fused=can_fuse(self.module, device))
        self.scheduler = make_lr_schedule(self.optimizer, optim)
        self.autocast = autocast_dtype(optim, device)
        self.ema = make_ema(self.module, optim)

    def train(self, mode: bool = True):
        self.wrapped.train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_memory_format(x, self.channels_last)
        if self.autocast is None:
            return self.wrapped(x)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.wrapped(x).float()  # the loss in fp32

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        if self.optim_cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.module, step=self.scheduler.updates)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Rank 0 writes weights + optimiser state (DDP replicas are identical)."""
        if world_rank() == 0:
            torch.save(self.module.state_dict(), directory / MODEL_FILE)
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "client": client_state}, directory / STATE_FILE)
        save_ema(self.ema, directory)

    def load(self, directory: Path) -> dict[str, Any]:
        with refusing_unsafe(directory):
            weights = load_file(directory / MODEL_FILE, map_location=self.device)
            state = load_file(directory / STATE_FILE, map_location=self.device)
        self.module.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        with refusing_unsafe(directory):
            load_ema(self.ema, directory, self.module)
        return state["client"]


@contextmanager
def refusing_unsafe(directory: Path):
    """A refused file becomes one line naming the checkpoint folder (what the user deletes)."""
    try:
        yield
    except UnsafeCheckpointFile as err:
        name = err.path.relative_to(directory) if err.path.is_relative_to(directory) else err.path
        raise UserError(f"checkpoint {directory} holds non-tensor objects ({name}: {err.reason}); "
                        "refusing to load it") from None


class WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine with its load replaced: torch.load(weights_only=True) with only
    DeepSpeed's plain-data classes allowed (trainer/safe_load.py says which and why). DeepSpeed reads
    every model-state and ZeRO shard through `checkpoint_engine.load`; saving is left as it was."""

    def __init__(self, inner: Any, allowed: list):
        self.inner, self.allowed = inner, allowed

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_file(path, map_location=map_location, allowed=self.allowed)

    def __getattr__(self, name: str) -> Any:  # create / save / commit / makedirs ... as DeepSpeed made them
        return getattr(self.inner, name)


def deepspeed_safe_classes() -> list:
    """The classes named in safe_load.DEEPSPEED_CLASS_NAMES, imported (only this module imports DeepSpeed)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class DeepSpeedEngine:
    """deepspeed.initialize on the Ray Train process group; ZeRO 0/1/2, bf16 on GPU."""

    def __init__(self, model: nn.Module, optim: OptimConfig, device: torch.device, micro_batch: int, bf16: bool,
                 channels_last: bool = False):
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        # channels_last here means NHWC inputs only: ZeRO flattens the parameters into one buffer,
        # which needs them contiguous (NHWC weights fail: "self.stride(-1) must be 1 to view Float
        # as Byte"). cuDNN then runs NHWC and converts each weight on the fly.
        self.channels_last = channels_last
        self.module = model.to(device)
        self.device = device
        # timm's optimiser (its no-decay groups) and schedule, handed to DeepSpeed as the client's
        optimizer = make_optimizer(self.module, optim)
        scheduler = make_lr_schedule(optimizer, optim)
        self.ema = make_ema(self.module, optim)  # fp32, copied before DeepSpeed casts the module to bf16
        self.grad_accum, self.micro_steps = optim.grad_accum, 0
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": optim.grad_accum,
            "zero_optimization": {"stage": optim.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if bf16:
            # DeepSpeed >= 0.19 casts parameters only and keeps buffers fp32; BatchNorm then fails
            # (bf16 weights, fp32 running stats: "expected scalar type BFloat16 but found Float",
            # found on an H100 with timm ResNet-50). Cast buffers with the parameters, as before.
            ds_config["data_types"] = {"buffer_dtype": "bf16"}
        if optim.grad_clip:
            ds_config["gradient_clipping"] = optim.grad_clip
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=False)
        # DeepSpeed's own loader unpickles with weights_only=False: code in a checkpoint would run
        self.ds.checkpoint_engine = WeightsOnlyLoads(self.ds.checkpoint_engine, deepspeed_safe_classes())
        self.bf16 = bf16

    def train(self, mode: bool = True):
        self.ds.train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_memory_format(x, self.channels_last)
        if self.bf16:
            x = x.to(torch.bfloat16)
        return self.ds(x).float()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()  # applies the optimiser (and the lr schedule) at accumulation boundaries
        self.micro_steps += 1
        if self.ema is not None and self.micro_steps % self.grad_accum == 0:
            self.ema.update(self.ds.module, step=self.micro_steps // self.grad_accum)

    @property
    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def save(self, directory: Path, client_state: dict[str, Any]) -> None:
        """Every rank writes its ZeRO shard; rank 0 also writes a plain fp32 model file for probes."""
        self.ds.save_checkpoint(str(directory), tag=DS_TAG, client_state=client_state)
        if world_rank() == 0:
            state = {k: v.float() if v.is_floating_point() else v for k, v in self.ds.module.state_dict().items()}
            torch.save(state, directory / MODEL_FILE)
        save_ema(self.ema, directory)

    def load(self, directory: Path) -> dict[str, Any]:
        with refusing_unsafe(directory):
            _, client_state = self.ds.load_checkpoint(str(directory), tag=DS_TAG)
            load_ema(self.ema, directory, self.ds.module)
        self.micro_steps = self.ds.global_steps * self.grad_accum
        return client_state or {}


def setup_engine(model: nn.Module, optim: OptimConfig, run: RunConfig, device: torch.device, world_size: int,
                 channels_last: bool | None = None):
    """The distributed engine, set up in one place. channels_last: None = wants_channels_last."""
    if channels_last is None:
        channels_last = wants_channels_last(model, device)
    if optim.engine == "deepspeed":
        bf16 = device.type == "cuda" and optim.precision in ("auto", "bf16")
        micro = optim.batch_size // world_size // optim.grad_accum
        return DeepSpeedEngine(model, optim, device, micro_batch=max(1, micro), bf16=bf16, channels_last=channels_last)
    return TorchEngine(model, optim, device, channels_last=channels_last)
