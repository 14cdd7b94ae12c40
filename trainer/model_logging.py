"""What a user browses in the MLflow UI besides params and metrics: the run's classifier as an MLflow
model (the final one and the best by the probe), the data it trained on, its system metrics and a
plot of its probe curve. MLflow itself is reached through trainer.tracking only.

The model, without pickle. `mlflow.pytorch.log_model` pickles the whole module by default, and
MLflow 3.17.2's `mlflow.pytorch.load_model` unpickles by default: MLFLOW_ALLOW_PICKLE_DESERIALIZATION
defaults to true, so a model saved (or edited in the store) as serialization_format="pickle" is
`torch.load`-ed with code execution, and a "pt2" archive goes through `torch.export.load`, which
unpickles its weights with weights_only=False, unchecked unless the user sets that variable to
false. linrep promises that nothing in a user's file is ever executed, so the model is logged as a
pyfunc of the `loader_module` flavour instead:

    MLmodel                             python_function: loader_module trainer.model_logging
    data/classifier/model.safetensors   the classifier's state_dict (safetensors: tensors only, no code)
    data/classifier/config.yaml         the resolved config
    data/classifier/meta.json           num_outputs, input spec, step

MLflow imports this installed module and calls `_load_pyfunc`, which rebuilds the classifier from
the config (trainer.models.build_classifier) and loads the weights from safetensors. No python_model
is pickled (the loader_module flavour has none), no code is copied into the artifact. Loading:

    model = mlflow.pyfunc.load_model("models:/<model_id>")   # or runs:/<run id>/..., models:/<name>/<version>
    logits = model.predict(x)                                # numpy float32 [B, K]
    classifier = model.get_raw_model()                       # the torch module (eval mode)

`load_logged_model(tracking_uri, model_uri)` does the same without MLflow's loader: it downloads the
files, checks the MLmodel (yaml.safe_load) names this module and carries no code paths, and
rebuilds the classifier: the way to load a model from a store other people can write to.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import tracking
from trainer.checkpoint import list_checkpoints, load_classifier, read_config, read_meta
from trainer.config import Config
from trainer.errors import UserError
from trainer.files import write_json_atomic, write_text_atomic
from trainer.models import Classifier, InputSpec, build_classifier
from trainer.storage import Location, locate

LOADER_MODULE = __name__
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
FINAL_MODEL = "final"
BEST_MODEL = "best"
ROLE_TAG = "linrep.model_role"          # on a logged model: final | best | final,best
STEP_TAG = "linrep.checkpoint_step"
BEST_STEP_TAG = "linrep.best_step"      # on the run: the step of the best-by-probe checkpoint
EXAMPLE_ROWS = 4                        # the input example's batch (> 1: the batch axis stays free)


# ---- the model's files and loader (MLflow calls _load_pyfunc) -----------------------------------
def write_model_files(checkpoint_dir: Path | str | Location, out_dir: Path) -> tuple[Classifier, Config, dict]:
    """The checkpoint's classifier as safetensors + its config and meta under out_dir."""
    from safetensors.torch import save_file

    model, cfg, meta = load_classifier(checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS_FILE))
    write_text_atomic(out_dir / CONFIG_FILE, cfg.to_yaml())
    write_json_atomic(out_dir / META_FILE, {k: v for k, v in meta.items() if k != "files"})
    return model, cfg, meta


def rebuild_classifier(data_dir: Path) -> Classifier:
    """The classifier of a logged model's data folder: config -> architecture, safetensors -> weights."""
    from safetensors.torch import load_file

    data_dir = Path(data_dir)
    meta, cfg = read_meta(data_dir), read_config(data_dir)
    model = build_classifier(cfg, InputSpec(**meta.get("input_spec", {})), int(meta["num_outputs"]))
    try:
        model.load_state_dict(load_file(str(data_dir / WEIGHTS_FILE)))
    except (RuntimeError, OSError) as err:
        raise UserError(f"logged model {data_dir}: weights do not fit model.encoder={cfg.model.encoder} "
                        f"({str(err).splitlines()[0][:120]})") from None
    return model.eval()


class ClassifierPyfunc:
    """What mlflow.pyfunc.load_model wraps: predict(x) -> logits; get_raw_model() -> the torch module."""

    def __init__(self, model: Classifier):
        self.model = model
        self.python_model = model  # PyFuncModel.unwrap_python_model() returns this

    def predict(self, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        with torch.no_grad():
            return self.model(torch.as_tensor(x, dtype=torch.float32)).numpy()

    def get_raw_model(self) -> Classifier:
        return self.model


def _load_pyfunc(data_path: str) -> ClassifierPyfunc:
    """MLflow's entry point for the loader_module flavour (its name is MLflow's, hence private)."""
    return ClassifierPyfunc(rebuild_classifier(Path(data_path)))


def load_logged_model(tracking_uri: str, model_uri: str) -> Classifier:
    """A logged linrep model, loaded without MLflow's loader: refuses an MLmodel that names another
    loader or carries code, so nothing from the store is imported or unpickled."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="linrep-model-") as tmp:
        local = tracking.download_model(tracking_uri, model_uri, Path(tmp))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        flavor = (mlmodel.get("flavors") or {}).get("python_function") or {}
        if flavor.get("loader_module") != LOADER_MODULE or flavor.get("code"):
            raise UserError(f"{model_uri} is not a linrep classifier (its MLmodel names loader "
                            f"{flavor.get('loader_module')!r}{' and carries code' if flavor.get('code') else ''})")
        data = (local / flavor.get("data", "data")).resolve()
        if not data.is_relative_to(local.resolve()):
            raise UserError(f"{model_uri}: its MLmodel points outside the model folder")
        return rebuild_classifier(data)


def example_batch(model: Classifier, spec: InputSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(input, logits) of a small seeded batch: the model's signature and input example."""
    gen = torch.Generator().manual_seed(seed)
    shape = (spec.dim,) if spec.dim is not None else (spec.channels, spec.size, spec.size)
    x = torch.randn(EXAMPLE_ROWS, *shape, generator=gen)
    with torch.no_grad():
        return x.numpy(), model(x).numpy()


def requirements() -> list[str]:
    """Pinned from this environment (given, so MLflow does not load the model in a subprocess to
    infer them); linrep itself provides the loader module."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "safetensors", "mlflow", "linrep"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            out.append(name)
    return out


# ---- logging a run's models ------------------------------------------------------------------
@dataclass
class ModelChoice:
    """Which checkpoints a run's models come from."""

    final_step: int
    final_dir: Any
    best_step: int | None = None  # the best by the probe's headline figure (None: never probed)
    best_dir: Any = None


def choose_checkpoints(run_dir: Path | str | Location, scores: dict[int, float]) -> ModelChoice | None:
    """The last complete checkpoint, and the complete one whose probe figure is highest (retention
    keeps it; the probe figures are higher-is-better, as probes.actor.BEST_METRIC's)."""
    ckpts = {read_meta(p)["step"]: p for p in list_checkpoints(run_dir)}
    if not ckpts:
        return None
    final = max(ckpts)
    scored = {s: v for s, v in scores.items() if s in ckpts}
    best = max(scored, key=lambda s: (scored[s], s)) if scored else None
    return ModelChoice(final, ckpts[final], best, ckpts[best] if best is not None else None)


def log_classifier(uri: str, run_id: str, checkpoint_dir, *, name: str, roles: list[str],
                   register_as: str | None = None) -> tracking.LoggedModel:
    """One checkpoint's classifier as a logged model `name` of the run, at the checkpoint's step."""
    with tempfile.TemporaryDirectory(prefix="linrep-model-") as tmp:
        data_dir = Path(tmp) / "classifier"  # MLflow copies it to data/classifier
        model, cfg, meta = write_model_files(checkpoint_dir, data_dir)
        example = example_batch(model, InputSpec(**meta.get("input_spec", {})), cfg.run.seed)
        tags = {ROLE_TAG: ",".join(roles), STEP_TAG: str(meta["step"]), "linrep.encoder": cfg.model.encoder}
        return tracking.log_pyfunc_model(uri, run_id, data_dir, loader_module=LOADER_MODULE, name=name,
                                         example=example, pip_requirements=requirements(), step=meta["step"],
                                         tags=tags, register_as=register_as)


def already_logged(uri: str, run_id: str, choice: ModelChoice) -> bool:
    """The run already has a final model of this checkpoint step (logged by an earlier attempt)."""
    return any(m["name"] == FINAL_MODEL and m["tags"].get(STEP_TAG) == str(choice.final_step)
               for m in tracking.logged_models(uri, run_id))


def log_run_models(uri: str, run_id: str, run_dir, cfg: Config, best_metric: str | None) -> dict[str, tracking.LoggedModel]:
    """The final classifier and, when another checkpoint scored higher on `best_metric` (the run's
    probe headline), the best one; tracking.register_model registers the best (the final one
    when they are the same checkpoint or nothing was probed)."""
    scores = dict(tracking.metric_history(uri, run_id, best_metric)) if best_metric else {}
    choice = choose_checkpoints(run_dir, scores)
    if choice is None:
        return {}
    if already_logged(uri, run_id, choice):  # a rerun of a finished run: nothing new to log
        return {}
    register = cfg.tracking.register_model
    same = choice.best_step in (None, choice.final_step)
    logged = {FINAL_MODEL: log_classifier(uri, run_id, choice.final_dir, name=FINAL_MODEL,
                                          roles=[FINAL_MODEL] + ([BEST_MODEL] if choice.best_step is not None and same else []),
                                          register_as=register if same else None)}
    if not same:
        logged[BEST_MODEL] = log_classifier(uri, run_id, choice.best_dir, name=BEST_MODEL, roles=[BEST_MODEL],
                                            register_as=register)
    tracking.set_tags(uri, run_id, {BEST_STEP_TAG: choice.best_step, "linrep.best_metric": best_metric if
                                    choice.best_step is not None else None,
                                    "linrep.final_model_id": logged[FINAL_MODEL].model_id,
                                    "linrep.best_model_id": logged.get(BEST_MODEL, logged[FINAL_MODEL]).model_id
                                    if choice.best_step is not None else None})
    return logged


# ---- the run's dataset -----------------------------------------------------------------------
def dataset_record(cfg: Config) -> dict[str, Any]:
    """name, digest, source of the data a run trains on. Shards: the manifest's sha256 (it lists
    every shard's sha256) and the shard folder's URI. Synthetic data has no files: its digest is
    the hash of the data section and data seed that generate it, its source synthetic://dgp?..."""
    if cfg.is_synthetic:
        spec = {**cfg.data.model_dump(mode="json"), "seed": cfg.data_seed}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        query = "&".join(f"{k}={spec[k]}" for k in ("dim", "num_classes", "kappa", "seed") if k in spec)
        return {"name": f"synthetic-d{cfg.data.dim}-C{cfg.data.num_classes}", "digest": digest[:16],
                "source_type": "synthetic", "source": {"uri": f"synthetic://dgp?{query}"},
                "profile": {"generator": "vMF mixture on the sphere (trainer.data.synthetic)", **spec}}
    from trainer.data.shards import MANIFEST_NAME, load_manifest

    root = locate(cfg.data.root)
    manifest = load_manifest(root)
    text = (root / MANIFEST_NAME).read_text()
    return {"name": manifest.dataset, "digest": hashlib.sha256(text.encode()).hexdigest()[:16],
            "source_type": "linrep-shards", "source": {"uri": str(root), "manifest": MANIFEST_NAME},
            "profile": {"num_samples": manifest.num_samples,
                        **{f"{split}_samples": manifest.split_samples(split) for split in manifest.splits}}}


def log_run_dataset(uri: str, run_id: str, cfg: Config) -> dict[str, Any]:
    record = dataset_record(cfg)
    tracking.log_dataset(uri, run_id, **record, context="training")
    return record


# ---- the run's plot --------------------------------------------------------------------------
def log_probe_plot(uri: str, run_id: str, metric: str | None, name: str = "plots/probe_curve.png") -> bool:
    """The run's probe headline (and train/acc) against the step, as an image artifact."""
    curves = {key: tracking.metric_history(uri, run_id, key) for key in (metric, "train/acc") if key}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=key)
    ax.set_xlabel("step")
    ax.set_title("probe and training accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tracking.log_figure(uri, run_id, fig, name)
    plt.close(fig)
    return True
