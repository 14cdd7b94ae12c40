"""Self-describing checkpoints: weights + the resolved config + step travel together.

Layout of a checkpoint directory:
    model.pt        the classifier's state_dict (fp32), loadable with torch.load(weights_only=True)
    model_ema.pt    optim.ema_decay: the EMA of the weights (fp32); probes read it instead of model.pt
    train_state.pt  optimiser/scheduler state (torch engine)   |  ds/  DeepSpeed shards (deepspeed)
    config.yaml     the resolved config
    meta.json       step, samples seen, num_outputs, input spec, data signature — written LAST, so a
                    directory without it (a crash during save) is never taken as a checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from trainer.config import Config, ConfigError, from_dict, save_config
from trainer.engine import EMA_FILE, MODEL_FILE, world_rank
from trainer.errors import UserError
from trainer.files import write_json_atomic
from trainer.safe_load import UnsafeCheckpointFile, load_file
from trainer.models import Classifier, InputSpec, build_classifier
from trainer.storage import Location, locate

Where = Path | str | Location  # a checkpoint folder: a local path, a URI or a Location

CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


def write_checkpoint(engine, cfg: Config, meta: dict[str, Any], directory: Path) -> None:
    """Every rank calls this (DeepSpeed shards); rank 0 writes config and, last, meta.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    engine.save(directory, client_state={"step": meta["step"]})
    if world_rank() == 0:
        save_config(cfg, directory / CONFIG_FILE)
        # meta lists every file with its size: a copy cut short (a crash while Ray persists the
        # checkpoint) is then detectable, not just a missing meta.json
        files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}
        write_json_atomic(directory / META_FILE, {**meta, "files": files})


def is_complete(directory: Where) -> bool:
    """meta.json present and every file it lists present with its recorded size (one listing of
    the folder, so it costs a single request on an object store)."""
    d = locate(directory)
    try:
        present = d.files()
    except OSError:
        return False
    if not {META_FILE, MODEL_FILE, CONFIG_FILE} <= present.keys():
        return False
    try:
        files = json.loads(d.child(META_FILE).read_text()).get("files", {})
    except (json.JSONDecodeError, OSError, UnicodeDecodeError, AttributeError):
        return False
    return all(present.get(name) == size for name, size in files.items())


def read_meta(directory: Where) -> dict[str, Any]:
    try:
        meta = json.loads(locate(directory).child(META_FILE).read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint {directory}: no {META_FILE} (incomplete or not a linrep checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"checkpoint {directory}: {META_FILE} is not valid JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise UserError(f"checkpoint {directory}: {META_FILE} lacks an integer 'step'")
    return meta


def read_config(directory: Where) -> Config:
    try:
        raw = yaml.safe_load(locate(directory).child(CONFIG_FILE).read_text())
        return from_dict(raw)
    except FileNotFoundError:
        raise UserError(f"checkpoint {directory}: no {CONFIG_FILE}") from None
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"checkpoint {directory}: {CONFIG_FILE} is not valid YAML") from None
    except ConfigError as err:
        raise UserError(f"checkpoint {directory}: {CONFIG_FILE}: {err}") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True): a pickle carrying code is refused, never executed."""
    try:
        state = load_file(path)
    except UnsafeCheckpointFile:
        raise  # one line: "checkpoint file ... holds non-tensor objects (...)"
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} does not exist") from None
    except Exception as err:  # UnpicklingError for code-carrying pickles, RuntimeError for truncation
        first = str(err).strip().splitlines()[0][:140] if str(err).strip() else err.__class__.__name__
        raise UserError(f"checkpoint file {path} cannot be loaded safely: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint file {path} does not hold a state_dict of tensors")
    return state


def check_sizes(directory: Path, meta: dict[str, Any], names: tuple[str, ...]) -> None:
    """The files a loader reads have the sizes meta.json lists (a copy cut short, or a file
    changed after the checkpoint was written, is refused in one line)."""
    listed = meta.get("files")
    if not isinstance(listed, dict):
        return  # written before meta listed sizes
    for name in names:
        path = directory / name
        if name in listed and path.is_file() and path.stat().st_size != listed[name]:
            raise UserError(f"checkpoint {directory}: {name} is {path.stat().st_size} bytes but {META_FILE} lists "
                            f"{listed[name]} (cut short or changed after the checkpoint was written)")


def load_classifier(directory: Where, device: str | torch.device = "cpu") -> tuple[Classifier, Config, dict]:
    """Rebuild the classifier from the checkpoint alone (config + meta + weights), in eval mode.

    A checkpoint on remote storage is copied to a temporary folder first (torch.load needs a local
    file): only the three files the model needs, not the optimizer state or DeepSpeed shards; the
    weights are in memory before the folder goes."""
    where = locate(directory)
    if not where.is_local:
        if not where.is_dir():
            raise UserError(f"checkpoint {where} is not a directory")
        with tempfile.TemporaryDirectory(prefix="linrep-probe-") as tmp:
            ema = [EMA_FILE] if EMA_FILE in where.files() else []
            try:
                local = where.download_files([META_FILE, CONFIG_FILE, MODEL_FILE, *ema], tmp)
            except FileNotFoundError as err:
                raise UserError(f"checkpoint {where}: {Path(str(err)).name} is missing") from None
            return load_classifier(local, device)
    directory = where.local_path
    if not directory.is_dir():
        raise UserError(f"checkpoint {directory} is not a directory")
    meta = read_meta(directory)
    check_sizes(directory, meta, (MODEL_FILE, CONFIG_FILE))
    cfg = read_config(directory)
    spec = InputSpec(**meta.get("input_spec", {}))
    model = build_classifier(cfg, spec, int(meta["num_outputs"]))
    state = load_state_dict(directory / probe_weights_file(directory))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"checkpoint {directory}: weights do not fit model.encoder={cfg.model.encoder} "
                        f"({str(err).splitlines()[0][:120]})") from None
    return model.to(device).eval(), cfg, meta


def probe_weights_file(directory: Path) -> str:
    """The weights a probe reads: the EMA's when the checkpoint has one (optim.ema_decay), else model.pt."""
    return EMA_FILE if (directory / EMA_FILE).is_file() else MODEL_FILE


def load_encoder(directory: Where, device: str | torch.device = "cpu"):
    """(encoder f, config): the features a probe decodes."""
    model, cfg, _ = load_classifier(directory, device)
    return model.encoder, cfg


def make_meta(step: int, samples_seen: int, num_outputs: int, spec: InputSpec, **extra) -> dict[str, Any]:
    return {"step": step, "samples_seen": samples_seen, "num_outputs": num_outputs,
            "input_spec": asdict(spec), **extra}


def list_checkpoints(run_dir: Where) -> list:
    """Complete checkpoints of a Ray Train run folder, by step: Paths for a local folder given as
    a path (as always), Locations for a Location or a URI."""
    where = locate(run_dir)
    found = [d for d in where.subdirs("checkpoint_") if is_complete(d)]
    found = sorted(((read_meta(d)["step"], d) for d in found), key=lambda pair: pair[0])
    as_paths = where.is_local and not isinstance(run_dir, Location)
    return [d.local_path if as_paths else d for _, d in found]


PRUNED_MARKER = "PRUNED"


def prune_checkpoints(run_dir: Where, keep_last: int, best_step: int | None = None,
                      probed_up_to: int | None = None) -> list[int]:
    """Retention: keep the last `keep_last` complete checkpoints and the best one; empty the others.

    A pruned folder keeps only a PRUNED marker: Ray Train's run snapshot still lists it (deleting
    it would make the run unresumable), but it is no longer complete, so it is never resumed from
    or probed. Returns the steps pruned. Works the same on a local folder and a bucket.
    probed_up_to: checkpoints after this step are still queued for their probe: never pruned.
    """
    ckpts = [locate(p) for p in list_checkpoints(locate(run_dir))]
    steps = [read_meta(p)["step"] for p in ckpts]
    keep = set(steps[-keep_last:]) | ({best_step} if best_step is not None else set())
    pruned = []
    for folder, step in zip(ckpts, steps):
        if step in keep or (probed_up_to is not None and step > probed_up_to):
            continue
        folder.child(META_FILE).unlink()  # first: the folder stops being complete
        folder.empty_dir()
        folder.child(PRUNED_MARKER).write_text(f"pruned by linrep retention (step {step})\n")
        pruned.append(step)
    return pruned
