"""Bad input, everywhere: a table of malformed inputs, each through linrep's real entry point.

Every case must end with exit status 2 (1 for runtime faults), ONE line on stderr that names the
offending item, and no traceback. Cases that need files build them in a temporary folder.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from linrep.cli import main
from tests.conftest import run_linrep
from trainer.checkpoint import make_meta, write_checkpoint
from trainer.config import load_config
from trainer.engine import TorchEngine
from trainer.models import InputSpec, build_classifier

MARKER = "linrep-pwned-marker"


# ---- builders of malformed inputs (each returns the argv and the text the error must name) ----
def cfg_file(tmp: Path, text: str) -> Path:
    p = tmp / "cfg.yaml"
    p.write_text(text)
    return p


def good_checkpoint(tmp: Path, hidden=(8,)) -> Path:
    cfg = load_config("synthetic-supervised", [f"model.hidden={list(hidden)}", "data.generator_pool=100"])
    model = build_classifier(cfg, InputSpec(dim=5), 100)
    path = tmp / "ckpt"
    write_checkpoint(TorchEngine(model, cfg.optim, torch.device("cpu")), cfg, make_meta(10, 0, 100, InputSpec(dim=5)),
                     path)
    return path


class Exploit:
    """A pickle payload that would create MARKER if it were ever unpickled."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def ckpt_malicious(tmp: Path):
    path = good_checkpoint(tmp)
    with open(path / "model.pt", "wb") as fh:
        pickle.dump({"w": Exploit()}, fh)
    return ["probe", str(path)], "model.pt"


def ckpt_malicious_torch_zip(tmp: Path):
    path = good_checkpoint(tmp)
    torch.save({"w": Exploit()}, path / "model.pt")  # a real torch zip archive carrying code
    return ["probe", str(path)], "model.pt"


def ckpt_truncated(tmp: Path):
    path = good_checkpoint(tmp)
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[:100])
    return ["probe", str(path)], "model.pt"


def ckpt_wrong_model(tmp: Path):
    path = good_checkpoint(tmp, hidden=(8,))
    other = good_checkpoint(tmp / "o", hidden=(16, 16))
    (path / "model.pt").write_bytes((other / "model.pt").read_bytes())
    return ["probe", str(path)], "weights do not fit"


def ckpt_no_meta(tmp: Path):
    path = good_checkpoint(tmp)
    (path / "meta.json").unlink()
    return ["probe", str(path)], "meta.json"


def ckpt_bad_meta(tmp: Path):
    path = good_checkpoint(tmp)
    (path / "meta.json").write_text("{not json")
    return ["probe", str(path)], "meta.json"


def ckpt_bad_config(tmp: Path):
    path = good_checkpoint(tmp)
    (path / "config.yaml").write_text(yaml.safe_dump({"data": {"kappa": -3}}))
    return ["probe", str(path)], "data.kappa"


def ckpt_not_a_dir(tmp: Path):
    return ["probe", str(tmp / "nothing/here")], "nothing/here"


def ckpt_tensor_list(tmp: Path):
    path = good_checkpoint(tmp)
    torch.save([torch.zeros(2)], path / "model.pt")
    return ["probe", str(path)], "state_dict"


def manifest_case(kind: str):
    def build(tmp: Path):
        root = tmp / "shards"
        root.mkdir()
        if kind == "invalid json":
            (root / "manifest.json").write_text("{oops")
        elif kind == "missing keys":
            (root / "manifest.json").write_text(json.dumps({"dataset": "dsprites"}))
        argv = ["train", "dislib-dsprites-mlp", f"data.root={root}"]
        return argv, "manifest.json"
    return build


def manifest_missing_shard(tmp: Path):
    from trainer.data.convert.dsprites import generate_dsprites

    root = tmp / "ds"
    generate_dsprites(root, limit=60, samples_per_shard=20, processes=1, progress=False)
    (root / "train-000001.tar").unlink()
    return ["train", "dislib-dsprites-mlp", f"data.root={root}"], "train-000001.tar"


def manifest_empty_dir(tmp: Path):
    (tmp / "empty").mkdir()
    return ["train", "dislib-dsprites-mlp", f"data.root={tmp / 'empty'}"], "manifest"


def manifest_continuous_factor(tmp: Path):
    from trainer.data.convert.dsprites import generate_dsprites

    root = tmp / "ds"
    generate_dsprites(root, limit=60, samples_per_shard=30, processes=1, progress=False)
    return ["train", "dislib-dsprites-mlp", f"data.root={root}", "data.factor=posX"], "posX"


def manifest_unknown_factor(tmp: Path):
    from trainer.data.convert.dsprites import generate_dsprites

    root = tmp / "ds"
    generate_dsprites(root, limit=60, samples_per_shard=30, processes=1, progress=False)
    return ["train", "dislib-dsprites-mlp", f"data.root={root}", "data.factor=colour_of_sky"], "colour_of_sky"


def converter_missing(tmp: Path):
    return ["data", "convert", "dsprites", str(tmp / "nope.npz"), "--out", str(tmp / "o")], "nope.npz"


def converter_text_as_npz(tmp: Path):
    (tmp / "fake.npz").write_text("hello")
    return ["data", "convert", "dsprites", str(tmp / "fake.npz"), "--out", str(tmp / "o")], "fake.npz"


def converter_npz_missing_key(tmp: Path):
    np.savez(tmp / "d.npz", imgs=np.zeros((2, 64, 64), np.uint8))
    return ["data", "convert", "dsprites", str(tmp / "d.npz"), "--out", str(tmp / "o")], "d.npz"


def converter_pickled_code(tmp: Path):
    buf = io.BytesIO()
    np.save(buf, np.array(Exploit(), dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp / "evil.npz", "w") as z:
        z.writestr("imgs.npy", _npy(np.zeros((1, 64, 64), np.uint8)))
        z.writestr("latents_values.npy", _npy(np.zeros((1, 6))))
        z.writestr("latents_classes.npy", _npy(np.zeros((1, 6), np.int64)))
        z.writestr("metadata.npy", buf.getvalue())
    return ["data", "convert", "dsprites", str(tmp / "evil.npz"), "--out", str(tmp / "o")], "evil.npz"


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def converter_smallnorb_bad_magic(tmp: Path):
    src = tmp / "norb"
    src.mkdir()
    for split, n in (("training", "46789"), ("testing", "01235")):
        for part in ("dat", "cat", "info"):
            (src / f"smallnorb-5x{n}x9x18x6x2x96x96-{split}-{part}.mat").write_bytes(b"\x00" * 64)
    return ["data", "convert", "smallnorb", str(src), "--out", str(tmp / "o")], "smallnorb-5x"


def converter_h5_not_h5(tmp: Path):
    (tmp / "3dshapes.h5").write_bytes(b"not an hdf5 file at all")
    return ["data", "convert", "shapes3d", str(tmp / "3dshapes.h5"), "--out", str(tmp / "o")], "3dshapes.h5"


def converter_cars_empty(tmp: Path):
    (tmp / "cars").mkdir()
    return ["data", "convert", "cars3d", str(tmp / "cars"), "--out", str(tmp / "o")], "cars"


def converter_mpi3d_wrong_length(tmp: Path):
    np.savez(tmp / "mpi3d_toy.npz", images=np.zeros((7, 64, 64, 3), np.uint8))
    return ["data", "convert", "mpi3d", str(tmp / "mpi3d_toy.npz"), "--out", str(tmp / "o")], "mpi3d_toy.npz"


def imagenet_missing(tmp: Path):
    return ["data", "imagenet", str(tmp / "no_imagenet"), "--out", str(tmp / "o")], "no_imagenet"


def spec_file(text: str, needle: str):
    def build(tmp: Path):
        p = tmp / "spec.yaml"
        p.write_text(text)
        return ["sweep", str(p)], needle
    return build


def static(argv: list[str], needle: str):
    return lambda tmp: (argv, needle)


BASE_SPEC = "name: s\nbase: synthetic-supervised\n"
CASES = {
    # config values and overrides
    "kappa zero": static(["train", "synthetic-supervised", "data.kappa=0"], "data.kappa"),
    "dim one": static(["train", "synthetic-supervised", "data.dim=1"], "data.dim"),
    "one class": static(["train", "synthetic-supervised", "data.num_classes=1"], "data.num_classes"),
    "instances < classes": static(["train", "synthetic-diet", "data.num_instances=10"], "data.num_instances"),
    "batch zero": static(["train", "synthetic-supervised", "optim.batch_size=0"], "optim.batch_size"),
    "lr negative": static(["train", "synthetic-supervised", "optim.lr=-1"], "optim.lr"),
    "workers zero": static(["train", "synthetic-supervised", "run.workers=0"], "run.workers"),
    "unknown key": static(["train", "synthetic-supervised", "optim.momentumm=0.9"], "optim.momentumm"),
    "unknown section": static(["train", "synthetic-supervised", "trainer.lr=1"], "trainer"),
    "wrong type": static(["train", "synthetic-supervised", "optim.steps=many"], "optim.steps"),
    "bad literal": static(["train", "synthetic-supervised", "data.conditional=cauchy"], "data.conditional"),
    "override without =": static(["train", "synthetic-supervised", "optim.lr"], "optim.lr"),
    "override without section": static(["train", "synthetic-supervised", "lr=3"], "lr"),
    "indivisible batch": static(["train", "synthetic-supervised", "run.workers=3"], "optim.batch_size"),
    "zero without deepspeed": static(["train", "synthetic-supervised", "optim.zero_stage=2"], "optim.zero_stage"),
    "bf16 on cpu": static(["train", "dislib-dsprites-mlp", "optim.precision=bf16"], "optim.precision"),
    "image data without root": static(["train", "synthetic-supervised", "data.dataset=dsprites"], "data.root"),
    "unknown preset": static(["train", "no-such-preset"], "no-such-preset"),
    "missing config file": static(["train", "missing.yaml"], "missing.yaml"),
    "config not yaml": lambda t: (["train", str(cfg_file(t, "data: [1, 2\n"))], "cfg.yaml"),
    "config a list": lambda t: (["train", str(cfg_file(t, "- 1\n- 2\n"))], "cfg.yaml"),
    "config unknown key": lambda t: (["train", str(cfg_file(t, "base: synthetic-supervised\nmodel: {depth: 3}\n"))],
                                     "model.depth"),
    # CLI arguments
    "unknown command": static(["fly"], "fly"),
    "train without config": static(["train"], "config"),
    "bad dataset name": static(["data", "convert", "mnist", "x", "--out", "y"], "mnist"),
    "data without --out": static(["data", "dsprites"], "--out"),
    "non-integer option": static(["data", "dsprites", "--out", "x", "--limit", "many"], "--limit"),
    "reproduce unknown arm": static(["reproduce", "imagenet-x"], "imagenet-x"),
    "probe unknown run": static(["probe", "0123456789abcdef"], "0123456789abcdef"),
    # checkpoints
    "checkpoint pickle with code": ckpt_malicious,
    "checkpoint torch zip with code": ckpt_malicious_torch_zip,
    "checkpoint truncated": ckpt_truncated,
    "checkpoint wrong model": ckpt_wrong_model,
    "checkpoint without meta": ckpt_no_meta,
    "checkpoint bad meta": ckpt_bad_meta,
    "checkpoint bad config": ckpt_bad_config,
    "checkpoint missing": ckpt_not_a_dir,
    "checkpoint not a state dict": ckpt_tensor_list,
    # manifests and shard folders
    "manifest invalid json": manifest_case("invalid json"),
    "manifest missing keys": manifest_case("missing keys"),
    "manifest missing shard": manifest_missing_shard,
    "shard folder empty": manifest_empty_dir,
    "factor not categorical": manifest_continuous_factor,
    "factor unknown": manifest_unknown_factor,
    # converter sources
    "converter missing file": converter_missing,
    "converter not an npz": converter_text_as_npz,
    "converter npz missing key": converter_npz_missing_key,
    "converter pickled code in metadata": converter_pickled_code,
    "converter smallnorb magic": converter_smallnorb_bad_magic,
    "converter h5 not h5": converter_h5_not_h5,
    "converter cars3d empty": converter_cars_empty,
    "converter mpi3d length": converter_mpi3d_wrong_length,
    "imagenet missing folder": imagenet_missing,
    # sweep specs
    "spec missing": static(["sweep", "no-such-spec.yaml"], "no-such-spec"),
    "spec unknown config key": spec_file(BASE_SPEC + "space:\n  data.kapa: {grid: [1, 2]}\n", "data.kapa"),
    "spec empty grid": spec_file(BASE_SPEC + "space:\n  data.kappa: {grid: []}\n", "data.kappa"),
    "spec bad range": spec_file(BASE_SPEC + "space:\n  model.temperature: {loguniform: [5, 1]}\n", "model.temperature"),
    "spec negative loguniform": spec_file(BASE_SPEC + "space:\n  optim.lr: {loguniform: [-1, 1]}\n", "optim.lr"),
    "spec refused value": spec_file(BASE_SPEC + "space:\n  data.kappa: {grid: [0, 10]}\n", "data.kappa"),
    "spec unknown top key": spec_file(BASE_SPEC + "colour: blue\n", "colour"),
    "spec not yaml": spec_file("name: [oops\n", "spec.yaml"),
    # values that used to pass validation and break the run (inf/nan, unsafe names, no machine holds it)
    "lr inf": static(["train", "synthetic-supervised", "optim.lr=inf"], "optim.lr"),
    "lr nan": static(["train", "synthetic-supervised", "optim.lr=nan"], "optim.lr"),
    "kappa inf": static(["train", "synthetic-supervised", "data.kappa=inf"], "data.kappa"),
    "temperature -inf": static(["train", "synthetic-supervised", "model.temperature=-inf"], "model.temperature"),
    "stop_at nan": static(["train", "synthetic-supervised", "run.stop_at={val/acc: .nan}"], "run.stop_at"),
    "config file inf": lambda t: (["train", str(cfg_file(t, "base: synthetic-supervised\noptim: {lr: .inf}\n"))],
                                  "optim.lr"),
    "run name escapes storage": static(["train", "synthetic-supervised", "run.name=../../escaped"], "run.name"),
    "run name with quote": static(["train", "synthetic-supervised", "run.name=a'b"], "run.name"),
    "run name too long": static(["train", "synthetic-supervised", "run.name=" + "n" * 300], "run.name"),
    "experiment with quote": static(["train", "synthetic-supervised", "tracking.experiment=a'b"],
                                    "tracking.experiment"),
    "classes beyond memory": static(["train", "synthetic-supervised", "data.num_classes=10000000000"],
                                    "data.num_classes"),
    "batch beyond memory": static(["train", "synthetic-supervised", "optim.batch_size=1000000000000"],
                                  "optim.batch_size"),
    "probe samples beyond memory": static(["train", "synthetic-supervised", "probe.samples=100000000000"],
                                          "probe.samples"),
    "instances beyond memory": static(["train", "synthetic-diet", "data.num_instances=100000000000"],
                                      "data.num_instances"),
    "dim beyond memory": static(["train", "synthetic-supervised", "data.dim=100000"], "data.dim"),
    "unreachable ray address": static(["train", "synthetic-fast", "--address", "127.0.0.1:1"], "127.0.0.1:1"),
    "malformed ray address": static(["train", "synthetic-fast", "--address", "head:port"], "head:port"),
}


@pytest.mark.parametrize("case", sorted(CASES), ids=sorted(CASES))
def test_bad_input_is_one_line_and_a_clean_exit(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, needle = CASES[case](tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    out = capsys.readouterr()
    lines = [l for l in out.err.splitlines() if l.strip()]
    assert code in (1, 2), (code, out.err[-2000:])
    assert len(lines) == 1, out.err[-2000:]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out
    assert not Path(MARKER).exists() and not (tmp_path / MARKER).exists()  # no code ran
    assert not (tmp_path / "ray_results").exists()  # refused before any training


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


# Through the real CLI in a subprocess (fd-level output): refused with exit 2 in one line before
# anything starts, no run folder, no MLflow store (so no RUNNING run), no folder outside the storage.
REFUSED_BEFORE_START = {
    "lr inf": (["optim.lr=inf"], "optim.lr"),
    "kappa inf": (["data.kappa=inf"], "data.kappa"),
    "temperature nan": (["model.temperature=nan"], "model.temperature"),
    "run name escapes storage": (["run.name=../../escaped"], "run.name"),
    "run name with quote": (["run.name=a'b"], "run.name"),
    "classes beyond memory": (["data.num_classes=10000000000"], "data.num_classes"),
    "batch beyond memory": (["optim.batch_size=1000000000000"], "optim.batch_size"),
    "probe samples beyond memory": (["probe.samples=100000000000"], "probe.samples"),
    "unreachable ray address": (["--address", "127.0.0.1:1"], "127.0.0.1:1"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BEFORE_START), ids=sorted(REFUSED_BEFORE_START))
def test_refused_through_the_cli_before_anything_starts(case, tmp_path):
    args, needle = REFUSED_BEFORE_START[case]
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    store = work / "mlflow.db"
    proc = run_linrep(["train", "synthetic-fast", f"tracking.uri=sqlite:///{store}", *args], cwd=work, timeout=120)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not store.exists() and not (work / "mlruns").exists()  # no MLflow run was opened
    assert not (work / "ray_results").exists() and not (tmp_path / "a" / "escaped").exists()
