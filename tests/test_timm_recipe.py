"""The ImageNet recipes through timm's factories: optimiser no-decay groups, the lr schedule, the
transforms, mixup/cutmix soft targets and the EMA of the weights (tiny timm models, pretrained=False,
no Ray: a few seconds)."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from PIL import Image

from trainer.config import load_config
from trainer.engine import TorchEngine, lr_factor
from trainer.models import InputSpec, build_classifier

TINY_VIT = ["model.encoder=test_vit", "data.image_size=32", "optim.engine=ddp", "optim.zero_stage=0",
            "run.use_gpu=false",
            "optim.steps=20", "optim.warmup_steps=4", "model.learn_temperature=true", "optim.batch_size=4",
            "run.workers=1"]


def tiny_engine(overrides: list[str]):
    cfg = load_config("imagenet-vit-b16", [*TINY_VIT, *overrides])
    torch.manual_seed(0)
    model = build_classifier(cfg, InputSpec(channels=3, size=32), 10)
    return cfg, TorchEngine(model, cfg.optim, torch.device("cpu"))


def decay_of(engine) -> dict[str, float]:
    """Parameter name -> the weight decay of the optimiser group holding it."""
    by_id = {id(p): g["weight_decay"] for g in engine.optimizer.param_groups for p in g["params"]}
    return {name: by_id[id(p)] for name, p in engine.module.named_parameters()}


def test_no_weight_decay_on_norms_biases_embeddings_and_temperature():
    cfg, engine = tiny_engine([])
    decay = decay_of(engine)
    assert cfg.optim.weight_decay == 0.05
    assert decay["log_beta"] == 0.0                                   # the learned temperature
    assert decay["encoder.pos_embed"] == 0.0 and decay["encoder.cls_token"] == 0.0
    norms = [n for n in decay if ".norm" in n]
    biases = [n for n in decay if n.endswith(".bias")]
    assert norms and biases and all(decay[n] == 0.0 for n in norms + biases)
    assert decay["head"] == 0.05 and decay["encoder.blocks.0.attn.qkv.weight"] == 0.05


@pytest.mark.parametrize("preset", ["imagenet-resnet50", "synthetic-fast"])
def test_temperature_out_of_weight_decay_in_every_preset(preset):
    extra = ["model.encoder=test_resnet", "data.image_size=32"] if preset.startswith("imagenet") else []
    cfg = load_config(preset, ["model.learn_temperature=true", "optim.weight_decay=0.01", "optim.engine=ddp", "optim.zero_stage=0",
                               "run.use_gpu=false", "run.workers=1", *extra])
    spec = InputSpec(channels=3, size=32) if extra else InputSpec(dim=cfg.data.dim)
    engine = TorchEngine(build_classifier(cfg, spec, 10), cfg.optim, torch.device("cpu"))
    decay = decay_of(engine)
    assert decay["log_beta"] == 0.0 and max(decay.values()) == 0.01


def test_schedule_matches_timm_warmup_then_cosine():
    from timm.scheduler import CosineLRScheduler

    cfg, engine = tiny_engine(["optim.min_lr_ratio=0.01"])
    o = cfg.optim
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
    reference = CosineLRScheduler(reference_opt, t_initial=o.steps - o.warmup_steps, lr_min=o.lr * o.min_lr_ratio,
                                  warmup_t=o.warmup_steps, warmup_lr_init=o.lr / o.warmup_steps, warmup_prefix=True,
                                  t_in_epochs=False)
    seen = []
    for step in range(o.steps + 2):
        reference.step_update(step)
        seen.append((engine.lr, reference_opt.param_groups[0]["lr"], lr_factor(step, o) * o.lr))
        engine.scheduler.step()
    for ours, timms, closed in seen:
        assert ours == pytest.approx(timms, rel=1e-9) and closed == pytest.approx(timms, rel=1e-9)
    assert seen[0][0] == pytest.approx(o.lr / o.warmup_steps)            # warm-up starts at lr / warmup
    assert seen[o.warmup_steps][0] == pytest.approx(o.lr)                 # peak where the warm-up ends
    assert seen[o.steps][0] == pytest.approx(o.lr * o.min_lr_ratio)       # cosine down to min_lr
    mid = o.warmup_steps + (o.steps - o.warmup_steps) // 2
    assert seen[mid][0] == pytest.approx(o.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5))))


def test_schedule_state_resumes_and_reads_old_lambdalr_state():
    _, engine = tiny_engine([])
    for _ in range(7):
        engine.scheduler.step()
    lr = engine.lr
    _, other = tiny_engine([])
    other.scheduler.load_state_dict({"last_epoch": 7})  # a checkpoint written with LambdaLR
    assert other.lr == pytest.approx(lr)


def test_transforms_come_from_timms_factories():
    from timm.data import create_transform, resolve_data_config
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    from trainer.data.imagenet import imagenet_eval_transform, imagenet_train_transform

    cfg = load_config("imagenet-vit-b16", ["data.image_size=32"])
    train = imagenet_train_transform(cfg.data, cfg.model.encoder, cfg.model.pretrained)
    kinds = [type(t) for t in train.transforms]
    assert RandAugment in kinds and RandomErasing in kinds
    expected = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}), is_training=True,
                                auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel")
    assert repr(train) == repr(expected)
    evaluation = imagenet_eval_transform(32)
    reference = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}), is_training=False)
    assert repr(evaluation.transforms[1]) == repr(reference)
    image = Image.new("L", (48, 40), 128)  # a greyscale image: converted to RGB first
    out = evaluation(image)
    assert out.shape == (3, 32, 32)
    random.seed(0)  # RandAugment draws its ops and magnitudes from `random`
    torch.manual_seed(0)
    assert train(image.convert("RGB")).shape == (3, 32, 32)


def test_randaugment_at_its_top_magnitude_posterizes_to_black_instead_of_failing():
    """The recipe's RandAugment ('inc1') keeps 4 - int(level * 4 / 10) bits: 0 at magnitude 10, which
    mstd0.5 reaches for ~2% of draws. Pillow 13 raises on bits=0 and killed a CI run mid-transform;
    the lock pins Pillow 12, where it is the black image timm means."""
    from timm.data.auto_augment import AugmentOp

    posterize = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = posterize(Image.new("RGB", (32, 32), (200, 120, 90)))
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))
    cfg = load_config("imagenet-vit-b16", ["data.image_size=32"])
    from trainer.data.imagenet import imagenet_train_transform

    train = imagenet_train_transform(cfg.data, cfg.model.encoder, cfg.model.pretrained)
    random.seed(1)
    image = Image.new("RGB", (48, 40), (90, 160, 30))
    for _ in range(1500):  # ~2 top-magnitude posterizes expected per 1000 draws
        assert train(image).shape == (3, 32, 32)


def test_mixup_cutmix_soft_targets_and_the_soft_loss():
    from timm.data import Mixup

    from trainer.loop import train_step

    cfg, engine = tiny_engine([])
    mix = Mixup(mixup_alpha=cfg.optim.mixup, cutmix_alpha=cfg.optim.cutmix,
                label_smoothing=cfg.optim.label_smoothing, num_classes=10)
    x, y = mix(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 10) and torch.allclose(y.sum(-1), torch.ones(4))
    loss, acc = train_step(engine, x, y, cfg.optim.label_smoothing)
    assert torch.isfinite(loss) and 0 <= float(acc) <= 1


def test_ema_updates_saves_and_resumes(tmp_path):
    cfg, engine = tiny_engine(["optim.ema_decay=0.5"])
    assert engine.ema is not None and next(engine.ema.module.parameters()).dtype == torch.float32
    before = {k: v.clone() for k, v in engine.ema.module.state_dict().items()}
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(3):
            engine.backward(torch.nn.functional.cross_entropy(engine.forward(x), y))
            engine.step()
    ema_now = engine.ema.module.state_dict()
    live = engine.module.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], ema_now[k])]
    assert moved, "the EMA did not move"
    key = "encoder.blocks.0.attn.qkv.weight"
    assert not torch.equal(ema_now[key], live[key])                        # an average, not a copy

    from trainer.engine import EMA_FILE

    engine.save(tmp_path, {"step": 3})
    assert (tmp_path / EMA_FILE).is_file()
    _, resumed = tiny_engine(["optim.ema_decay=0.5"])
    resumed.load(tmp_path)
    assert torch.equal(resumed.ema.module.state_dict()[key], ema_now[key])
    assert resumed.scheduler.updates == 3


def test_probes_read_the_ema_weights(tmp_path):
    from trainer.checkpoint import load_classifier, make_meta, write_checkpoint

    cfg, engine = tiny_engine(["optim.ema_decay=0.5"])
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(2):  # timm's EMA copies the weights at its first update, averages from the second
        engine.backward(torch.nn.functional.cross_entropy(engine.forward(x), y))
        engine.step()
    write_checkpoint(engine, cfg, make_meta(1, 4, 10, InputSpec(channels=3, size=32)), tmp_path)
    model, _, _ = load_classifier(tmp_path)
    key = "encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], engine.ema.module.state_dict()[key])
    assert not torch.equal(model.state_dict()[key], engine.module.state_dict()[key])
