"""Encoders from the registry, the head's four normalisation cases and the temperature."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import load_config
from trainer.models import InputSpec, build_classifier, create_encoder, list_encoders


@pytest.mark.parametrize("case,unit_f,unit_w", [("C1", True, True), ("C2", True, False), ("C3", False, True),
                                                ("C4", False, False)])
def test_normalisation_cases(case, unit_f, unit_w):
    cfg = load_config("synthetic-diet", [f"model.case={case}", "model.hidden=[16,16]", "model.temperature=10",
                                         "model.learn_temperature=false"])
    model = build_classifier(cfg, InputSpec(dim=5), 1000)
    x = torch.randn(32, 5)
    f = model.features(x)
    w = model.head_weights()
    assert torch.allclose(f.norm(dim=-1), torch.ones(32), atol=1e-5) == unit_f
    assert torch.allclose(w.norm(dim=-1), torch.ones(1000), atol=1e-5) == unit_w
    logits = model(x)
    assert torch.allclose(logits, 10.0 * f @ w.T, atol=1e-4)


def test_learned_temperature_gets_gradients_and_fixed_does_not():
    cfg = load_config("synthetic-supervised", ["model.learn_temperature=true", "model.hidden=[8]"])
    model = build_classifier(cfg, InputSpec(dim=5), 100)
    model(torch.randn(16, 5)).logsumexp(-1).mean().backward()
    assert model.log_beta.grad is not None and model.log_beta.requires_grad
    fixed = build_classifier(load_config("synthetic-supervised", ["model.hidden=[8]", "model.learn_temperature=false"]),
                             InputSpec(dim=5), 100)
    assert not fixed.log_beta.requires_grad


def test_paper_encoder_widths():
    cfg = load_config("synthetic-supervised")
    enc, dim = create_encoder(cfg.model, InputSpec(dim=5))
    widths = [m.out_features for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [50, 250, 250, 250, 250, 50, 5] and dim == 5
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in enc.modules()) == 6


@pytest.mark.parametrize("name", list_encoders())
def test_every_registered_encoder_builds(name):
    cfg = load_config("synthetic-supervised", [f"model.encoder={name}"]).model
    spec = InputSpec(dim=5) if name == "synthetic_mlp" else InputSpec(channels=1, size=32)
    enc, dim = create_encoder(cfg, spec)
    x = torch.randn(4, 5) if spec.dim else torch.randn(4, 1, 32, 32)
    enc.eval()
    assert enc(x).shape == (4, dim)


def test_any_timm_name_and_unknown_names():
    from trainer.errors import UserError

    cfg = load_config("synthetic-supervised", ["model.encoder=resnet10t"]).model
    enc, dim = create_encoder(cfg, InputSpec(channels=3, size=32))
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    bad = load_config("synthetic-supervised", ["model.encoder=not_a_model"]).model
    with pytest.raises(UserError, match="not_a_model"):
        create_encoder(bad, InputSpec(channels=3, size=32))


def test_a_learned_temperature_saved_as_a_scalar_still_loads():
    """The learned log β is a [1] parameter (DeepSpeed broadcasts parameters as bytes; a 0-d one
    fails): a state dict from before, with a scalar, loads into it unchanged in value."""
    cfg = load_config("synthetic-supervised", ["model.hidden=[8]", "model.learn_temperature=true",
                                               "model.temperature=3.0"])
    model = build_classifier(cfg, InputSpec(dim=5), 10)
    assert model.log_beta.shape == (1,) and abs(model.temperature - 3.0) < 1e-6
    old = {k: v.clone() for k, v in model.state_dict().items()}
    old["log_beta"] = torch.tensor(math.log(7.0))  # a 0-d tensor, as older checkpoints hold it
    fresh = build_classifier(cfg, InputSpec(dim=5), 10)
    fresh.load_state_dict(old)
    assert fresh.log_beta.shape == (1,) and abs(fresh.temperature - 7.0) < 1e-5
