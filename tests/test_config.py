"""The config tree: presets, overrides, and every refused value (one line naming the key, exit 2)."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO, run_linrep
from trainer.config import Config, ConfigError, list_presets, load_config, parse_override


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_loads(preset):
    cfg = load_config(preset) if preset.startswith("synthetic") else load_config(preset, ["data.root=/tmp/x"])
    assert cfg.preset == preset
    assert isinstance(cfg, Config)


def test_overrides_apply_and_parse_types():
    cfg = load_config("synthetic-supervised", ["data.num_classes=1000", "optim.lr=1e-3", "model.case=C3",
                                                "model.learn_temperature=true", "model.hidden=[8,8]"])
    assert cfg.data.num_classes == 1000
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.unit_weights and not cfg.unit_features
    assert cfg.model.learn_temperature is True
    assert cfg.model.hidden == [8, 8]


def test_diet_preset_is_case_c1_with_instances():
    cfg = load_config("synthetic-diet")
    assert cfg.data.labels == "instance" and cfg.data.num_instances == 1000
    assert cfg.unit_features and cfg.unit_weights


def test_flatten_and_fingerprint():
    a = load_config("synthetic-supervised")
    b = load_config("synthetic-supervised", ["run.name=other"])
    c = load_config("synthetic-supervised", ["data.kappa=5"])
    assert a.flatten()["data.kappa"] == 10.0
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


BAD = [
    (["data.kappa=0"], "data.kappa"),
    (["data.kappa=-1"], "data.kappa"),
    (["data.dim=1"], "data.dim"),
    (["data.num_classes=1"], "data.num_classes"),
    (["data.labels=instance", "data.num_instances=50"], "data.num_instances"),
    (["optim.batch_size=0"], "optim.batch_size"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-0.1"], "optim.lr"),
    (["run.workers=0"], "run.workers"),
    (["data.colour=1"], "data.colour"),
    (["optim.lr=fast"], "optim.lr"),
    (["data.labels=partition"], "data.labels"),
    (["optim.batch_size=1000", "run.workers=3"], "optim.batch_size"),
    (["optim.zero_stage=2"], "optim.zero_stage"),
    (["optim.warmup_steps=5000"], "optim.warmup_steps"),
    (["nosection=1"], "nosection"),
    (["data.conditional=cauchy"], "data.conditional"),
    (["model.case=C5"], "model.case"),
    (["run.stop_at={val/acc: 0.999}", "probe.enabled=false"], "run.stop_at"),
    (["run.stop_at={train/loss: 0.1}"], "run.stop_at"),
    (["run.stop_at=0.999"], "run.stop_at"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic-supervised", overrides)
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_stop_at_takes_a_mapping_of_probe_figures():
    cfg = load_config("synthetic-supervised", ["run.stop_at={probe/r2_affine: 0.99, val/acc: 0.5}"])
    assert cfg.run.stop_at == {"probe/r2_affine": 0.99, "val/acc": 0.5}


def test_override_syntax():
    assert parse_override("optim.lr=3e-3") == (["optim", "lr"], 0.003)
    with pytest.raises(ConfigError):
        parse_override("optim.lr")
    with pytest.raises(ConfigError):
        parse_override("lr=3")


def test_yaml_file_with_base(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text(yaml.safe_dump({"base": "synthetic-supervised", "data": {"num_classes": 10}}))
    cfg = load_config(str(f))
    assert cfg.data.num_classes == 10 and cfg.data.kappa == 10.0 and cfg.preset == "exp"


@pytest.mark.parametrize("text,needle", [("data: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "mapping")])
def test_malformed_config_files(tmp_path, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(str(f))


def test_cli_refuses_before_ray_starts(tmp_path):
    proc = run_linrep(["train", "synthetic-supervised", "data.kappa=0"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "data.kappa" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlruns").exists()


def test_cli_unknown_preset(tmp_path):
    proc = run_linrep(["train", "no-such-preset"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "no-such-preset" in proc.stderr and "Traceback" not in proc.stderr
