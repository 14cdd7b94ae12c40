"""Bad input, everywhere: malformed inputs, each through the real CLI in a subprocess.

Every case must end with exactly the documented exit status (2: bad input, trainer/errors.py),
ONE line on stderr that names the offending item, nothing on stdout, no traceback, and nothing
written: the case's folder (inputs, cwd, the MLflow store and run storage the environment points
at) is byte-for-byte what it was before the command ran.

Cases are grouped by what is wrong; each group is one parametrised test whose cases run as
concurrent subprocesses (a config error ends before torch, Ray or MLflow are imported, in about
0.4 s on a 2-core VM, so the interpreter start dominates). The checkpoint and shard groups need
torch and are slower.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from tests.conftest import run_cli

MARKER = "linrep-pwned-marker"
CASE_TIMEOUT_S = 120  # one case; far below pytest's global timeout (pyproject.toml)
PARALLEL = 3  # concurrent cases: on 2 cores, 3 keeps both busy while one process starts or exits

Builder = Callable[[Path], tuple[list[str], str]]  # case folder -> (argv, text the error line must name)
EXIT_BAD_INPUT = 2


# ---- builders of malformed inputs -------------------------------------------------------------
def static(argv: list[str], needle: str) -> Builder:
    return lambda tmp: (argv, needle)


def train(*overrides: str, needle: str, preset: str = "synthetic-supervised") -> Builder:
    return static(["train", preset, *overrides], needle)


def cfg_file(text: str, needle: str, name: str = "cfg.yaml") -> Builder:
    def build(tmp: Path):
        (tmp / name).write_text(text)
        return ["train", str(tmp / name)], needle
    return build


_TEMPLATES: dict[tuple, Path] = {}  # one checkpoint / shard set built per session, copied per case


def template(key: tuple, build: Callable[[Path], Path]) -> Path:
    if key not in _TEMPLATES:
        folder = Path(tempfile.mkdtemp(prefix="linrep-bad-input-"))
        atexit.register(shutil.rmtree, folder, True)
        _TEMPLATES[key] = build(folder)
    return _TEMPLATES[key]


def good_checkpoint(tmp: Path, hidden=(8,)) -> Path:
    path = tmp / "ckpt"
    shutil.copytree(template(("ckpt", hidden), lambda folder: build_checkpoint(folder, hidden)), path)
    return path


def build_checkpoint(tmp: Path, hidden) -> Path:
    import torch

    from trainer.checkpoint import make_meta, write_checkpoint
    from trainer.config import load_config
    from trainer.engine import TorchEngine
    from trainer.models import InputSpec, build_classifier

    cfg = load_config("synthetic-supervised", [f"model.hidden={list(hidden)}", "data.generator_pool=100"])
    model = build_classifier(cfg, InputSpec(dim=5), 100)
    path = tmp / "ckpt"
    write_checkpoint(TorchEngine(model, cfg.optim, torch.device("cpu")), cfg, make_meta(10, 0, 100, InputSpec(dim=5)),
                     path)
    return path


class Exploit:
    """A pickle payload that would create MARKER (in the cwd) if it were ever unpickled."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def checkpoint_case(damage: Callable[[Path], None], needle: str, restamp: bool = True) -> Builder:
    """A checkpoint damaged after it was written; restamp: meta.json then lists the damaged files'
    sizes (a crafted folder, which the size check alone does not catch)."""
    def build(tmp: Path):
        path = good_checkpoint(tmp)
        damage(path)
        meta_file = path / "meta.json"
        if restamp and meta_file.exists():
            try:
                meta = json.loads(meta_file.read_text())
                meta["files"] = {p.name: p.stat().st_size for p in path.iterdir() if p.name != "meta.json"}
                meta_file.write_text(json.dumps(meta))
            except (json.JSONDecodeError, TypeError):
                pass  # the damage is meta.json itself
        return ["probe", str(path)], needle
    return build


def _pickle_code(path: Path) -> None:
    with open(path / "model.pt", "wb") as fh:
        pickle.dump({"w": Exploit()}, fh)


def _torch_zip_code(path: Path) -> None:
    import torch

    torch.save({"w": Exploit()}, path / "model.pt")  # a real torch zip archive carrying code


def _truncate(path: Path) -> None:
    (path / "model.pt").write_bytes((path / "model.pt").read_bytes()[:100])


def _wrong_model(path: Path) -> None:
    other = good_checkpoint(path.parent / "other", hidden=(16, 16))
    (path / "model.pt").write_bytes((other / "model.pt").read_bytes())


def _tensor_list(path: Path) -> None:
    import torch

    torch.save([torch.zeros(2)], path / "model.pt")


def _meta(text: str) -> Callable[[Path], None]:
    return lambda path: (path / "meta.json").write_text(text)


def _meta_edit(**changes) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        meta = json.loads((path / "meta.json").read_text())
        meta.update(changes)
        (path / "meta.json").write_text(json.dumps(meta))
    return damage


def _wrong_size(path: Path) -> None:
    with open(path / "model.pt", "ab") as fh:
        fh.write(b"\0" * 16)  # meta.json lists another size: a copy cut short or padded


def dsprites_shards(tmp: Path, per_shard: int = 30) -> Path:
    def build(folder: Path) -> Path:
        from trainer.data.convert.dsprites import generate_dsprites

        generate_dsprites(folder / "ds", limit=60, samples_per_shard=per_shard, processes=1, progress=False)
        return folder / "ds"

    root = tmp / "ds"
    shutil.copytree(template(("dsprites", per_shard), build), root)
    return root


def shard_case(damage: Callable[[Path], None] | None, needle: str, *overrides: str, per_shard: int = 30) -> Builder:
    def build(tmp: Path):
        root = dsprites_shards(tmp, per_shard)
        if damage:
            damage(root)
        return ["train", "dislib-dsprites-mlp", f"data.root={root}", *overrides], needle
    return build


def manifest_text(text: str, needle: str = "manifest.json") -> Builder:
    def build(tmp: Path):
        root = tmp / "shards"
        root.mkdir()
        (root / "manifest.json").write_text(text)
        return ["train", "dislib-dsprites-mlp", f"data.root={root}"], needle
    return build


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def converter(dataset: str, make: Callable[[Path], Path], needle: str) -> Builder:
    def build(tmp: Path):
        return ["data", "convert", dataset, str(make(tmp)), "--out", str(tmp / "o")], needle
    return build


def _write(name: str, data: bytes | str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        p = tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p
    return make


def _npz_missing_key(tmp: Path) -> Path:
    np.savez(tmp / "d.npz", imgs=np.zeros((2, 64, 64), np.uint8))
    return tmp / "d.npz"


def _npz_pickled_code(tmp: Path) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.array(Exploit(), dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp / "evil.npz", "w") as z:
        z.writestr("imgs.npy", _npy(np.zeros((1, 64, 64), np.uint8)))
        z.writestr("latents_values.npy", _npy(np.zeros((1, 6))))
        z.writestr("latents_classes.npy", _npy(np.zeros((1, 6), np.int64)))
        z.writestr("metadata.npy", buf.getvalue())
    return tmp / "evil.npz"


def _smallnorb_bad_magic(tmp: Path) -> Path:
    src = tmp / "norb"
    src.mkdir()
    for split, n in (("training", "46789"), ("testing", "01235")):
        for part in ("dat", "cat", "info"):
            (src / f"smallnorb-5x{n}x9x18x6x2x96x96-{split}-{part}.mat").write_bytes(b"\x00" * 64)
    return src


def _empty_dir(name: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).mkdir()
        return tmp / name
    return make


def _mpi3d_wrong_length(tmp: Path) -> Path:
    np.savez(tmp / "mpi3d_toy.npz", images=np.zeros((7, 64, 64, 3), np.uint8))
    return tmp / "mpi3d_toy.npz"


def spec(text: str, needle: str, *extra: str) -> Builder:
    def build(tmp: Path):
        (tmp / "spec.yaml").write_text(text)
        return ["sweep", str(tmp / "spec.yaml"), *extra], needle
    return build


def with_file(name: str, text: str, argv: Callable[[Path], list[str]], needle: str) -> Builder:
    def build(tmp: Path):
        (tmp / name).write_text(text)
        return argv(tmp), needle
    return build


BASE_SPEC = "name: s\nbase: synthetic-supervised\n"
JOBS = ["--address", "http://127.0.0.1:1"]  # nothing listens on port 1

# ---- the cases, grouped by what is wrong ------------------------------------------------------
GROUPS: dict[str, dict[str, Builder]] = {
    "config values": {
        "kappa zero": train("data.kappa=0", needle="data.kappa"),
        "dim one": train("data.dim=1", needle="data.dim"),
        "one class": train("data.num_classes=1", needle="data.num_classes"),
        "instances < classes": train("data.num_instances=10", preset="synthetic-diet", needle="data.num_instances"),
        "batch zero": train("optim.batch_size=0", needle="optim.batch_size"),
        "lr negative": train("optim.lr=-1", needle="optim.lr"),
        "steps negative": train("optim.steps=-5", needle="optim.steps"),
        "workers zero": train("run.workers=0", needle="run.workers"),
        "wrong type": train("optim.steps=many", needle="optim.steps"),
        "seed not a number": train("run.seed=abc", needle="run.seed"),
        "boolean not a boolean": train("tracking.enabled=maybe", needle="tracking.enabled"),
        "bad literal": train("data.conditional=cauchy", needle="data.conditional"),
        "bad label scheme": train("data.labels=partition", needle="data.labels"),
        "indivisible batch": train("run.workers=3", needle="optim.batch_size"),
        "warmup not below steps": train("optim.warmup_steps=100000", needle="optim.warmup_steps"),
        "zero without deepspeed": train("optim.zero_stage=2", needle="optim.zero_stage"),
        "grad accumulation without deepspeed": train("optim.grad_accum=4", needle="optim.grad_accum"),
        "bf16 on cpu": train("optim.precision=bf16", preset="dislib-dsprites-mlp", needle="optim.precision"),
        "image data without root": train("data.dataset=dsprites", needle="data.root"),
        "feature dim on synthetic": train("model.feature_dim=3", needle="model.feature_dim"),
        "stop_at not a probe figure": train("run.stop_at={train/loss: 1.0}", needle="train/loss"),
        "stop_at without probes": train("run.stop_at={probe/r2_affine: 0.9}", "probe.enabled=false",
                                        needle="probe.enabled"),
        "probe attempts zero": train("probe.max_attempts=0", needle="probe.max_attempts"),
        "drain timeout zero": train("probe.drain_timeout_s=0", needle="probe.drain_timeout_s"),
        "lr inf": train("optim.lr=inf", needle="optim.lr"),
        "lr nan": train("optim.lr=nan", needle="optim.lr"),
        "kappa inf": train("data.kappa=inf", needle="data.kappa"),
        "temperature -inf": train("model.temperature=-inf", needle="model.temperature"),
        "stop_at nan": train("run.stop_at={val/acc: .nan}", needle="run.stop_at"),
        "classes beyond memory": train("data.num_classes=10000000000", needle="data.num_classes"),
        "batch beyond memory": train("optim.batch_size=1000000000000", needle="optim.batch_size"),
        "probe samples beyond memory": train("probe.samples=100000000000", needle="probe.samples"),
        "instances beyond memory": train("data.num_instances=100000000000", preset="synthetic-diet",
                                         needle="data.num_instances"),
        "dim beyond memory": train("data.dim=100000", needle="data.dim"),
    },
    "overrides": {
        "unknown key": train("optim.momentumm=0.9", needle="optim.momentumm"),
        "unknown section": train("trainer.lr=1", needle="trainer"),
        "without =": train("optim.lr", needle="optim.lr"),
        "without section": train("lr=3", needle="lr"),
        "section as a value": train("data=3", needle="data"),
        "empty key": train("=3", needle="override key"),
        "value not yaml": train("optim.lr=[1,", needle="optim.lr"),
        "sweep override refused": spec(BASE_SPEC, "data.kappa", "data.kappa=0"),
    },
    "run and experiment names": {
        "run name escapes storage": train("run.name=../../escaped", needle="run.name"),
        "run name with quote": train("run.name=a'b", needle="run.name"),
        "run name with space": train("run.name=a b", needle="run.name"),
        "run name hidden": train("run.name=.hidden", needle="run.name"),
        "run name too long": train("run.name=" + "n" * 300, needle="run.name"),
        "experiment with quote": train("tracking.experiment=a'b", needle="tracking.experiment"),
        "experiment with ..": train("tracking.experiment=a/../b", needle="tracking.experiment"),
        "sweep name escapes": spec(BASE_SPEC, "../up", "--name", "../up"),
        "sweep name in spec": spec("name: ../up\nbase: synthetic-supervised\n", "name"),
    },
    "presets and config files": {
        "unknown preset": static(["train", "no-such-preset"], "no-such-preset"),
        "missing config file": static(["train", "missing.yaml"], "missing.yaml"),
        "config a folder": lambda t: (["train", str(t)], str(t)),
        "config not yaml": cfg_file("data: [1, 2\n", "cfg.yaml"),
        "config a list": cfg_file("- 1\n- 2\n", "cfg.yaml"),
        "config empty": cfg_file("", "cfg.yaml"),
        "config not utf-8": lambda t: ((t / "bin.yaml").write_bytes(b"\xff\xfe\x00data"),
                                       (["train", str(t / "bin.yaml")], "bin.yaml"))[1],
        "config unknown key": cfg_file("base: synthetic-supervised\nmodel: {depth: 3}\n", "model.depth"),
        "config section a scalar": cfg_file("base: synthetic-supervised\noptim: 3\n", "optim"),
        "config inf": cfg_file("base: synthetic-supervised\noptim: {lr: .inf}\n", "optim.lr"),
        "config base unknown": cfg_file("base: no-such-base\n", "no-such-base"),
        "config base a list": cfg_file("base: [1]\n", "base"),
        "config base loops": lambda t: ((t / "loop.yaml").write_text(f"base: {t / 'loop.yaml'}\n"),
                                        (["train", str(t / "loop.yaml")], "loops"))[1],
        "presets take no argument": static(["presets", "extra"], "extra"),
    },
    "command line": {
        "unknown command": static(["fly"], "fly"),
        "no command": static([], "COMMAND"),
        "train without config": static(["train"], "config"),
        "train unknown option": static(["train", "synthetic-fast", "--gpus", "2"], "--gpus"),
        "sweep without spec": static(["sweep"], "spec"),
        "reproduce unknown arm": static(["reproduce", "imagenet-x"], "imagenet-x"),
        "reproduce budget negative": static(["reproduce", "synthetic", "--budget", "-1"], "--budget"),
        "reproduce budget not a number": static(["reproduce", "synthetic", "--budget", "lots"], "--budget"),
        "reproduce seeds zero": static(["reproduce", "synthetic", "--seeds", "0"], "--seeds"),
        "reproduce dislib seeds zero": static(["reproduce", "dislib", "--seeds", "0"], "--seeds"),
        "reproduce dislib root a file": lambda t: ((t / "root").write_text("x"),
                                                   (["reproduce", "dislib", "--root", str(t / "root")], "--root"))[1],
        "reproduce dislib root not creatable": lambda t: ((t / "file").write_text("x"), (
            ["reproduce", "dislib", "--root", str(t / "file" / "root")], "cannot be created"))[1],
        "reproduce dislib wrong dataset": lambda t: ((t / "root" / "mpi3d").mkdir(parents=True), (
            t / "root" / "mpi3d" / "manifest.json").write_text('{"dataset": "cars3d"}'),
            (["reproduce", "dislib", "--root", str(t / "root")], "manifest.json"))[2],
        "reproduce root outside dislib": static(["reproduce", "synthetic", "--root", "data"], "--root"),
        "reproduce set outside dislib": static(["reproduce", "synthetic", "--set", "run.workers=2"], "--set"),
        "reproduce dislib set reserved": static(["reproduce", "dislib", "--set", "run.seed=1"], "run.seed"),
        "reproduce dislib models unknown": static(["reproduce", "dislib", "--models", "mlp,vit"], "--models"),
        "reproduce models outside dislib": static(["reproduce", "imagenetx", "--models", "mlp"], "--models"),
        "reproduce dislib root not writable": static(["reproduce", "dislib", "--root", "/proc/linrep-x"], "--root"),
        "bench unknown": static(["bench", "nosuch"], "nosuch"),
        "bench out unwritable": static(["bench", "identifiability", "--out", "/proc/linrep-x"], "--out"),
        "bench out a file": with_file("f.txt", "x", lambda t: ["bench", "identifiability", "--out", str(t / "f.txt")],
                                      "--out"),
        "ui port not a number": static(["ui", "--port", "notaport"], "--port"),
    },
    "probe targets": {
        "probe not a run id": static(["probe", "xyz"], "xyz"),
        "probe short hex": static(["probe", "0123456789abcdef"], "0123456789abcdef"),
        "probe unknown run, no store": static(["probe", "0123456789abcdef0123456789abcdef"],
                                              "0123456789abcdef0123456789abcdef"),
        "probe extra arguments": static(["probe", "0123456789abcdef0123456789abcdef", "extra"], "extra"),
        "probe checkpoint missing": lambda t: (["probe", str(t / "nothing/here")], "nothing/here"),
    },
    "submit and jobs": {
        "submit nothing": static(["submit", *JOBS], "nothing to submit"),
        "submit unknown command": static(["submit", *JOBS, "--", "fly"], "fly"),
        "submit ui": static(["submit", *JOBS, "--", "ui"], "ui"),
        "submit bad config": static(["submit", *JOBS, "--", "train", "synthetic-supervised", "data.kappa=0"],
                                    "data.kappa"),
        "submit address not http": static(["submit", "--address", "ftp://h:1", "--", "train", "synthetic-fast"],
                                          "ftp://h:1"),
        "submit address bad port": static(["submit", "--address", "http://127.0.0.1:99999", "--", "train",
                                           "synthetic-fast"], "port"),
        "submit address unreachable": static(["submit", *JOBS, "--", "train", "synthetic-fast"], "127.0.0.1:1"),
        "submit token file missing": lambda t: (["submit", *JOBS, "--token-file", str(t / "no-token"), "--",
                                                 "train", "synthetic-fast"], "no-token"),
        "submit token file empty": with_file("token", "", lambda t: ["submit", *JOBS, "--token-file", str(t / "token"),
                                                                     "--", "train", "synthetic-fast"], "token"),
        "submit working dir missing": lambda t: (["submit", *JOBS, "--working-dir", str(t / "nowd"), "--", "train",
                                                  "synthetic-fast"], "nowd"),
        "jobs logs unreachable": static(["jobs", "logs", "some-job", *JOBS], "127.0.0.1:1"),
        "jobs unknown action": static(["jobs", "explode"], "explode"),
    },
    "sweep specs": {
        "spec missing": static(["sweep", "no-such-spec.yaml"], "no-such-spec"),
        "spec not yaml": spec("name: [oops\n", "spec.yaml"),
        "spec not a mapping": spec("- a\n- b\n", "spec.yaml"),
        "spec without base": spec("name: s\n", "base"),
        "spec unknown base": spec("name: s\nbase: no-such-base\n", "no-such-base"),
        "spec unknown config key": spec(BASE_SPEC + "space:\n  data.kapa: {grid: [1, 2]}\n", "data.kapa"),
        "spec empty grid": spec(BASE_SPEC + "space:\n  data.kappa: {grid: []}\n", "data.kappa"),
        "spec bad range": spec(BASE_SPEC + "space:\n  model.temperature: {loguniform: [5, 1]}\n", "model.temperature"),
        "spec negative loguniform": spec(BASE_SPEC + "space:\n  optim.lr: {loguniform: [-1, 1]}\n", "optim.lr"),
        "spec refused value": spec(BASE_SPEC + "space:\n  data.kappa: {grid: [0, 10]}\n", "data.kappa"),
        "spec refused axis value": spec(BASE_SPEC + "classes: {grid: [1, 10]}\n", "classes"),
        "spec unknown top key": spec(BASE_SPEC + "colour: blue\n", "colour"),
        "spec seeds zero": spec(BASE_SPEC + "seeds: 0\n", "seeds"),
        "spec bad mode": spec(BASE_SPEC + "mode: sideways\n", "mode"),
        "spec max_concurrent zero": spec(BASE_SPEC + "max_concurrent: 0\n", "max_concurrent"),
        "spec refused override": spec(BASE_SPEC + "overrides: {optim.lr: -1}\n", "optim.lr"),
        "spec in_process impossible": spec(BASE_SPEC + "resources: {workers: 2, in_process: true}\n", "in_process"),
    },
    "converter sources": {
        "converter missing file": converter("dsprites", lambda t: t / "nope.npz", "nope.npz"),
        "converter not an npz": converter("dsprites", _write("fake.npz", "hello"), "fake.npz"),
        "converter npz missing key": converter("dsprites", _npz_missing_key, "d.npz"),
        "converter pickled code in metadata": converter("dsprites", _npz_pickled_code, "evil.npz"),
        "converter smallnorb magic": converter("smallnorb", _smallnorb_bad_magic, "smallnorb-5x"),
        "converter h5 not h5": converter("shapes3d", _write("3dshapes.h5", b"not an hdf5 file"), "3dshapes.h5"),
        "converter cars3d empty": converter("cars3d", _empty_dir("cars"), "cars"),
        "converter mpi3d length": converter("mpi3d", _mpi3d_wrong_length, "mpi3d_toy.npz"),
        "converter unknown dataset": static(["data", "convert", "mnist", "x", "--out", "y"], "mnist"),
        "data without --out": static(["data", "dsprites"], "--out"),
        "limit not a number": static(["data", "dsprites", "--out", "x", "--limit", "many"], "--limit"),
        "limit negative": lambda t: (["data", "dsprites", "--out", str(t / "o"), "--limit", "-5"], "--limit"),
        "samples per shard zero": lambda t: (["data", "dsprites", "--out", str(t / "o"), "--samples-per-shard", "0"],
                                             "--samples-per-shard"),
        "processes zero": lambda t: (["data", "dsprites", "--out", str(t / "o"), "--processes", "0"], "--processes"),
        "out unwritable": static(["data", "dsprites", "--out", "/proc/linrep-out", "--limit", "5"], "--out"),
        "out a file": with_file("f.txt", "x", lambda t: ["data", "dsprites", "--out", str(t / "f.txt"), "--limit", "5"],
                                "--out"),
        "imagenet missing folder": lambda t: (["data", "imagenet", str(t / "no_imagenet"), "--out", str(t / "o")],
                                              "no_imagenet"),
    },
}

# These import torch (a checkpoint is read, shards are checked by the driver): slower
TORCH_GROUPS: dict[str, dict[str, Builder]] = {
    "checkpoints": {
        "checkpoint pickle with code": checkpoint_case(_pickle_code, "model.pt"),
        "checkpoint torch zip with code": checkpoint_case(_torch_zip_code, "model.pt"),
        "checkpoint truncated": checkpoint_case(_truncate, "model.pt"),
        "checkpoint wrong model": checkpoint_case(_wrong_model, "weights do not fit"),
        "checkpoint without meta": checkpoint_case(lambda p: (p / "meta.json").unlink(), "meta.json"),
        "checkpoint bad meta": checkpoint_case(_meta("{not json"), "meta.json"),
        "checkpoint meta a list": checkpoint_case(_meta("[1, 2]"), "meta.json"),
        "checkpoint file size differs": checkpoint_case(_wrong_size, "model.pt", restamp=False),
        "checkpoint bad config": checkpoint_case(
            lambda p: (p / "config.yaml").write_text(yaml.safe_dump({"data": {"kappa": -3}})), "data.kappa"),
        "checkpoint not a state dict": checkpoint_case(_tensor_list, "state_dict"),
    },
    "shards and addresses": {
        "manifest invalid json": manifest_text("{oops"),
        "manifest missing keys": manifest_text(json.dumps({"dataset": "dsprites"})),
        "shard folder empty": lambda t: ((t / "empty").mkdir(),
                                         (["train", "dislib-dsprites-mlp", f"data.root={t / 'empty'}"], "manifest"))[1],
        "shard folder missing": lambda t: (["train", "dislib-dsprites-mlp", f"data.root={t / 'gone'}"], "gone"),
        "shard missing": shard_case(lambda root: (root / "train-000001.tar").unlink(), "train-000001.tar",
                                    per_shard=20),
        "factor not categorical": shard_case(None, "posX", "data.factor=posX"),
        "factor unknown": shard_case(None, "colour_of_sky", "data.factor=colour_of_sky"),
        "unreachable ray address": static(["train", "synthetic-fast", "--address", "127.0.0.1:1"], "127.0.0.1:1"),
        "malformed ray address": static(["train", "synthetic-fast", "--address", "head:port"], "head:port"),
        "sweep malformed ray address": spec(BASE_SPEC, "head:port", "--address", "head:port"),
    },
}
ALL_GROUPS = {**GROUPS, **TORCH_GROUPS}


# ---- the check ----------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root, with size and mtime: 'nothing written' compares two."""
    seen = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        seen[str(path.relative_to(root))] = (path.is_dir(), st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return seen


def case_env(folder: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", LINREP_STORAGE=str(folder / "storage"))
    return env


def problems_of(name: str, builder: Builder, folder: Path) -> str | None:
    """Run one case; None when it ends as promised, else what went wrong."""
    work = folder / "cwd"
    work.mkdir(parents=True)
    argv, needle = builder(folder)
    before = snapshot(folder)
    proc = run_cli(argv, cwd=work, env=case_env(folder), timeout=CASE_TIMEOUT_S)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    what = f"{name}: linrep {' '.join(argv)[:200]}\n    exit {proc.returncode}, stderr: {proc.stderr[-800:]!r}"
    if proc.returncode != EXIT_BAD_INPUT:
        return f"{what}\n    expected exit {EXIT_BAD_INPUT}"
    if len(lines) != 1 or needle not in lines[0] or not lines[0].startswith("linrep"):
        return f"{what}\n    expected one line naming {needle!r}"
    if proc.stdout.strip() or "Traceback" in proc.stderr:
        return f"{what}\n    expected nothing on stdout and no traceback, stdout: {proc.stdout[-400:]!r}"
    after = snapshot(folder)
    if after != before:
        changed = sorted(set(after.items()) ^ set(before.items()))[:5]
        return f"{what}\n    wrote or changed: {changed}"
    if (work / MARKER).exists() or Path(MARKER).exists():
        return f"{what}\n    code from the input ran ({MARKER} exists)"
    return None


def check_group(cases: dict[str, Builder], tmp_path: Path) -> None:
    folders = {name: tmp_path / f"case{i:03d}" for i, name in enumerate(sorted(cases))}
    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = pool.map(lambda name: problems_of(name, cases[name], folders[name]), sorted(cases))
        failures = [o for o in outcomes if o]
    assert not failures, f"{len(failures)} of {len(cases)} cases broke the promise:\n" + "\n".join(failures)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(group, tmp_path):
    check_group(GROUPS[group], tmp_path)


@pytest.mark.parametrize("group", sorted(TORCH_GROUPS))
def test_bad_checkpoints_shards_and_addresses(group, tmp_path):
    check_group(TORCH_GROUPS[group], tmp_path)


# Refused with exit 2 in one line before anything starts: no run folder, no MLflow store (so no
# RUNNING run), no folder outside the storage, and, for config errors, before torch is imported.
def test_a_config_error_ends_before_torch_ray_or_mlflow_are_imported(tmp_path):
    probe = ("import sys, runpy\n"
             "sys.argv = ['linrep', 'train', 'synthetic-supervised', 'data.kappa=0']\n"
             "try:\n    runpy.run_module('linrep', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    heavy = sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed') if m in sys.modules)\n"
             "    print('exit', e.code, 'heavy', heavy)\n")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=CASE_TIMEOUT_S, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.stdout.strip() == "exit 2 heavy []", proc.stdout + proc.stderr[-1000:]
