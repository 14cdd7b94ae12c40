"""The config tree: presets, overrides, and every refused value (one line naming the key, exit 2)."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO, run_linrep
from trainer.config import Config, ConfigError, list_presets, load_config, parse_override
from trainer.errors import UserError
from trainer.memory import GIB, check_memory, probe_needs, worker_needs
from trainer.run import contained_run_dir, ray_endpoint


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


def test_diet_preset_is_the_public_scripts_case_c3_with_instances():
    cfg = load_config("synthetic-diet")  # train_selfsup.sh --normalize-rows-W: f(x) free, rows of W unit-norm, β = 1
    assert cfg.data.labels == "instance" and cfg.data.num_instances == 1000
    assert not cfg.unit_features and cfg.unit_weights and cfg.model.temperature == 1.0


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
    # non-finite numbers, in every float of the tree
    (["optim.lr=inf"], "optim.lr"),
    (["optim.lr=-inf"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["data.kappa=inf"], "data.kappa"),
    (["data.kappa=.nan"], "data.kappa"),
    (["model.temperature=inf"], "model.temperature"),
    (["optim.grad_clip=inf"], "optim.grad_clip"),
    (["optim.weight_decay=1e999"], "optim.weight_decay"),
    (["run.cpus_per_worker=nan"], "run.cpus_per_worker"),
    (["run.stop_at={val/acc: .inf}"], "run.stop_at"),
    (["data.conditional_scale=inf"], "data.conditional_scale"),
    # names that would leave the storage folder or break MLflow's filter
    (["run.name=../../etc"], "run.name"),
    (["run.name=a'b"], "run.name"),
    (["run.name=a/b"], "run.name"),
    (["run.name=.hidden"], "run.name"),
    (["run.name=" + "x" * 129], "run.name"),
    (["run.name=with space"], "run.name"),
    (["tracking.experiment=a'b"], "tracking.experiment"),
    (["tracking.experiment=../x"], "tracking.experiment"),
    # what no machine holds, refused before a step runs
    (["data.num_classes=10000000000"], "data.num_classes"),
    (["optim.batch_size=1000000000000"], "optim.batch_size"),
    (["probe.samples=100000000000"], "probe.samples"),
    (["data.dim=100000"], "data.dim"),
    (["model.hidden=[1000000,1000000]"], "model.hidden"),
    (["data.labels=instance", "data.num_instances=100000000000"], "data.num_instances"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config("synthetic-supervised", overrides)
    msg = str(err.value)
    assert key in msg and "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize("value,fix", [("optim.lr=inf", "the default is 0.001"),
                                       ("data.kappa=nan", "the default is 10.0")])
def test_non_finite_numbers_name_the_fix(value, fix):
    with pytest.raises(ConfigError, match="finite") as err:
        load_config("synthetic-supervised", [value])
    assert fix in str(err.value)


@pytest.mark.parametrize("name", ["my-run_2", "a.b", "A" * 128, "bench-classes-x-kappa-C10-k5-s0"])
def test_safe_names_are_kept(name):
    assert load_config("synthetic-supervised", [f"run.name={name}"]).run_name() == name


def test_experiment_names_take_workspace_paths():
    cfg = load_config("synthetic-supervised", ["tracking.experiment=/Users/me@example.com/linrep"])
    assert cfg.experiment_name == "/Users/me@example.com/linrep"


def test_derived_run_name_is_safe_for_any_file_name(tmp_path):
    f = tmp_path / "my exp's (1).yaml"
    f.write_text(yaml.safe_dump({"base": "synthetic-supervised"}))
    name = load_config(str(f)).run_name()
    assert name.startswith("my_exp_s__1_-")
    assert load_config("synthetic-supervised", [f"run.name={name}"]).run.name == name  # a name it accepts


def test_run_folder_stays_inside_storage(tmp_path):
    assert contained_run_dir(tmp_path, "ok") == tmp_path / "ok"
    for escape in ("../escaped", "../../etc", "/abs", "."):
        with pytest.raises(UserError, match="outside run.storage"):
            contained_run_dir(tmp_path, escape)


@pytest.mark.parametrize("preset", list_presets())
def test_presets_fit_in_a_small_machine(preset):
    """The memory floor is a floor: every preset fits in 1 GiB per process (the CI machines have more)."""
    cfg = load_config(preset) if preset.startswith("synthetic") else load_config(preset, ["data.root=/tmp/x"])
    check_memory(cfg, available=GIB)
    assert sum(n.nbytes for n in worker_needs(cfg)) < GIB and sum(n.nbytes for n in probe_needs(cfg)) < GIB


def test_memory_check_names_the_largest_need():
    cfg = load_config("synthetic-supervised")
    with pytest.raises(ConfigError) as err:
        check_memory(cfg, available=1024)
    msg = str(err.value)
    assert "would need ~" in msg and "GiB available; lower " in msg and "\n" not in msg


@pytest.mark.parametrize("address,endpoint", [("127.0.0.1:1", ("127.0.0.1", 1)), ("head", ("head", 6379)),
                                              ("ray://head:10001", ("head", 10001)), ("[::1]:6379", ("::1", 6379)),
                                              ("auto", None), ("http://head:8265", None)])
def test_ray_addresses_parse(address, endpoint):
    assert ray_endpoint(address) == endpoint


@pytest.mark.parametrize("address", ["head:port", "head:99999"])
def test_malformed_ray_address_is_refused(address):
    with pytest.raises(UserError, match="not host:port"):
        ray_endpoint(address)


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


@pytest.mark.parametrize("uri", ["postgresql://linrep:s3cr3t-pw@db.test:5432/mlflow",
                                 "https://user:tok3n-value@mlflow.test/"])
def test_credentials_of_the_tracking_uri_are_never_written(tmp_path, uri):
    """params, config.yaml and a checkpoint's config carry the URI without its user:password part."""
    from trainer.config import resolve, save_config

    cfg = resolve("synthetic-fast", [f"tracking.uri={uri}"])
    secret = uri.split("://", 1)[1].split("@", 1)[0]
    save_config(cfg, tmp_path / "config.yaml")
    written = [str(cfg.flatten()), cfg.to_yaml(), (tmp_path / "config.yaml").read_text()]
    assert all(secret not in text and secret.split(":")[1] not in text for text in written)
    assert cfg.flatten()["tracking.uri"] == uri.replace(secret, "***")
    assert cfg.tracking.uri == uri  # the driver still connects with it
    assert cfg.fingerprint() == resolve("synthetic-fast").fingerprint()  # tracking never names a run
