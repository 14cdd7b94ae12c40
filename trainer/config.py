"""One typed config tree for every linrep run, and the one place configs are resolved.

`resolve(source, overrides)` is the entry point: a YAML preset (``trainer/presets/<name>.yaml``),
a user file or a raw dict, then ``key.sub=value`` overrides, then the whole tree is validated:
field ranges first (pydantic), cross-field checks second (``Config.check``). `config_field(key)`
is the one lookup of a dotted key. Every error is a ``ConfigError`` whose message is one line
naming the key and what is allowed, so the CLI can print it and exit 2 before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from pydantic.fields import FieldInfo

from trainer.errors import UserError
from trainer.files import write_text_atomic

PRESET_DIR = Path(__file__).parent / "presets"

SYNTHETIC = "synthetic"


class ConfigError(UserError):
    """A config problem, phrased as one line that names the key and the fix.

    `problem` is the bare reason of a refused value (e.g. "input should be greater than 0"), for
    callers that phrase the key themselves (a sweep spec names the axis that set the value).
    """

    def __init__(self, message: str, *, problem: str | None = None):
        super().__init__(message)
        self.problem = problem or message


class _Section(BaseModel):
    # allow_inf_nan=False: every float of the tree (and of nested dicts/lists such as run.stop_at)
    # refuses inf, -inf and nan; one of them in optim.lr or data.kappa only shows up as a nan loss.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


# ---- names -----------------------------------------------------------------------------------
NAME_MAX = 128
"""Longest run / experiment name; a sweep's trial keys (<= 96 characters + a 7-character hash) fit."""
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
"""Run names become a folder under run.storage and a value in MLflow's search filter: letters,
digits, '.', '_' and '-' only (no '/', quotes or spaces), not starting with '.' or '-'."""
SAFE_EXPERIMENT = re.compile(r"[A-Za-z0-9_/@][A-Za-z0-9._/@-]*")
"""Experiment names also take '/' and '@' (Databricks names experiments by workspace path,
/Users/me@example.com/linrep); they never become a folder, and '..' is refused all the same."""


def redact_uri(uri: str) -> str:
    """scheme://user:secret@host/... -> scheme://***@host/... (credentials are never written)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        authority, sep, path = rest.partition("/")
        if "@" in authority:
            return f"{scheme}://***@{authority.rsplit('@', 1)[1]}{sep}{path}"
    return uri


def name_problem(value: str, *, experiment: bool = False) -> str | None:
    """Why `value` is not a safe run (or experiment) name, or None when it is."""
    pattern, extra = (SAFE_EXPERIMENT, " '/' '@'") if experiment else (SAFE_NAME, "")
    if not 1 <= len(value) <= NAME_MAX:
        return f"must be 1 to {NAME_MAX} characters long (got {len(value)})"
    if not pattern.fullmatch(value) or (experiment and ".." in value):
        return (f"may only use letters, digits and . _ -{extra}, not start with '.' or '-'"
                f"{' nor hold ..' if experiment else ''}, e.g. my-run_2")
    return None


def _safe_name(value: str | None, *, experiment: bool = False) -> str | None:
    problem = None if value is None else name_problem(value, experiment=experiment)
    if problem:
        raise PydanticCustomError("unsafe_name", problem)
    return value


def safe_name_part(text: str) -> str:
    """`text` with every character a run name does not take replaced by '_' (for derived names)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".-") or "run"


class DataConfig(_Section):
    dataset: Literal["synthetic", "dsprites", "shapes3d", "mpi3d", "cars3d", "smallnorb", "imagenet"] = SYNTHETIC
    """Which data: the paper's synthetic DGP, a DisLib dataset (shards under data.root) or ImageNet."""
    seed: int | None = None
    """Seed of the data-generating process (cluster vectors, generator g, splits); None = run.seed."""
    dim: int = Field(5, ge=2)
    """Synthetic: dimension d of the latent sphere S^{d-1}."""
    num_classes: int = Field(100, ge=2)
    """Number of classes: |C| of the synthetic DGP, or K of the image `partition` label scheme."""
    kappa: float = Field(10.0, gt=0)
    """Synthetic: concentration κ of the class-conditional vMF (an inverse temperature of the data)."""
    num_instances: int = Field(1000, ge=2)
    """Synthetic DIET: number N of instance labels; instance i belongs to class i mod |C|."""
    labels: Literal["class", "instance", "factor", "partition", "imagenet"] = "class"
    """Label scheme: class (supervised) | instance (DIET) for synthetic; factor | partition | instance
    for DisLib; imagenet (see data.granularity) for ImageNet."""
    conditional: Literal["vmf", "laplace", "normal"] = "vmf"
    """Synthetic: class-conditional of z. laplace/normal are drawn in R^d around v_c and projected to
    the sphere (they violate the theory's assumptions)."""
    conditional_scale: float = Field(1.0, gt=0)
    """Synthetic: Laplace scale b, or Normal variance σ², of the non-vMF conditionals."""
    cluster_marginal: Literal["uniform", "laplace", "normal"] = "uniform"
    """Synthetic: distribution of the cluster vectors v_c: uniform on the sphere, or Laplace/Normal
    around e1 projected to the sphere."""
    marginal_scale: float = Field(1.0, gt=0)
    """Synthetic: scale of the Laplace/Normal cluster-vector marginal."""
    generator_layers: int = Field(4, ge=1, le=16)
    """Synthetic: number of layers of the invertible leaky-ReLU MLP g."""
    generator_pool: int = Field(10000, ge=1, le=1_000_000)
    """Synthetic: candidate weight matrices per layer of g; the best-conditioned one is kept."""
    root: str | None = None
    """Image datasets: folder with the WebDataset shards and manifest.json (`linrep data ...`)."""
    factor: str | None = None
    """Image datasets, labels=factor: the categorical factor to classify (default: the manifest's)."""
    granularity: Literal["1000", "100", "binary"] = "1000"
    """ImageNet: 1000 classes, 100 metaclasses (imagenet-x mapping) or binary (class < 500)."""
    image_size: int = Field(64, ge=8, le=1024)
    """Image datasets: side of the square input images fed to the model."""
    auto_augment: str | None = None
    """ImageNet training: timm's auto-augment policy string, e.g. rand-m9-mstd0.5-inc1 (RandAugment);
    None = off."""
    random_erasing: float = Field(0.0, ge=0, le=1)
    """ImageNet training: probability of timm's random erasing per image (0 = off)."""
    shuffle_buffer: int = Field(5000, ge=0)
    """Image datasets: WebDataset shuffle buffer (samples) per loader process."""
    loader_workers: int = Field(1, ge=0, le=64)
    """Image datasets: data-loader processes per Ray Train worker (0 = in the training process)."""
    max_samples: int | None = Field(None, ge=1)
    """Image datasets: use only the first N training samples per epoch (subsets for CI)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Image datasets: a corrupt shard or sample stops the run (raise) or is skipped and counted."""

    @field_validator("granularity", mode="before")
    @classmethod
    def _granularity_as_text(cls, v):
        """data.granularity=1000 on a command line or in a sweep arrives as a number."""
        return str(int(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


class ModelConfig(_Section):
    encoder: str = "synthetic_mlp"
    """Encoder f: a registered name (synthetic_mlp, dislib_mlp, resnet18) or any timm model name."""
    hidden: list[int] | None = None
    """Hidden widths of MLP encoders; None = the paper's ([10d,50d,50d,50d,50d,10d] / [512]*3)."""
    feature_dim: int | None = Field(None, ge=1)
    """Dimension of f(x); None = data.dim for synthetic, the backbone's width for images."""
    case: Literal["C1", "C2", "C3", "C4"] | None = None
    """Theorem 1 normalisation case; sets normalize_features / normalize_weights (C1: both, C2: f,
    C3: W, C4: neither). None = use those two fields as given."""
    normalize_features: bool = False
    """Unit-norm f(x) before the head."""
    normalize_weights: bool = False
    """Unit-norm rows w_j of the head W."""
    temperature: float = Field(1.0, gt=0)
    """Head temperature β: logits = β <w_j, f(x)> (the initial value if learned)."""
    learn_temperature: bool = False
    """Learn β (as log β) jointly with the model."""
    pretrained: bool = False
    """timm encoders: load pretrained weights (needs the weights on this machine)."""
    drop_rate: float = Field(0.0, ge=0, lt=1)
    """timm encoders: dropout before the (removed) classifier."""
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    """timm encoders: stochastic depth (drop-path) rate of the deepest block (timm's drop_path_rate)."""


class OptimConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    """Optimiser."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (decoupled for adamw)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD momentum."""
    batch_size: int = Field(1024, gt=0)
    """Global batch size (split evenly over run.workers)."""
    steps: int = Field(3000, gt=0)
    """Optimiser steps of the run."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after the warm-up."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Cosine schedule: final lr as a fraction of the peak."""
    grad_clip: float | None = Field(None, gt=0)
    """Clip the global gradient norm to this value."""
    grad_accum: int = Field(1, ge=1)
    """Gradient accumulation micro-steps per optimiser step (DeepSpeed engine)."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """Cross-entropy label smoothing."""
    mixup: float = Field(0.0, ge=0)
    """Mixup alpha for image datasets (0 = off); with cutmix > 0 timm's Mixup picks one per batch."""
    cutmix: float = Field(0.0, ge=0)
    """CutMix alpha for image datasets (0 = off)."""
    ema_decay: float | None = Field(None, gt=0, lt=1)
    """Keep an EMA of the weights (timm's ModelEmaV3, fp32) with this decay, e.g. 0.99996; None = off.
    Checkpointed (model_ema.pt) and resumed; probes then read the EMA weights."""
    engine: Literal["ddp", "deepspeed"] = "ddp"
    """Distributed engine: torch DDP (light, for small synthetic models) or DeepSpeed."""
    zero_stage: int = Field(0, ge=0, le=2)
    """DeepSpeed ZeRO stage (0, 1 or 2)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto = bf16 on GPU, fp32 on CPU."""


class RunConfig(_Section):
    name: str | None = None
    """Run name (Ray Train run folder, MLflow run name); None = <preset>-<config hash>."""
    seed: int = 0
    """Seed of initialisation, sampling and shuffling."""
    workers: int = Field(1, ge=1, le=4096)
    """Ray Train workers."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved per Ray Train worker."""
    threads_per_worker: int | None = Field(None, ge=1)
    """torch intra-op threads per worker; None = cpus_per_worker rounded."""
    storage: str = "./ray_results"
    """Ray Train storage (checkpoints); shared storage (NFS, S3) on multi-node clusters."""
    checkpoint_every: int = Field(500, ge=1)
    """Checkpoint (and probe) every K steps; the last step always checkpoints."""
    keep_checkpoints: int = Field(3, ge=1)
    """Checkpoints kept (the latest K, plus the best by the probe metric)."""
    max_failures: int = Field(3, ge=0)
    """Worker failures tolerated; each restarts from the latest checkpoint."""
    in_process: bool | None = None
    """`linrep train` of one CPU worker on the torch engine, on this machine (no --address or
    $RAY_ADDRESS, probes without probe.actor_* resources): train in the command's own process, with
    its probes on a thread, instead of starting Ray, a Train controller and a worker group (~10 s
    of a short run). None = do so whenever the run allows; false = always Ray Train; true = require
    it. run.max_failures restarts from the newest checkpoint either way. Sweeps choose with their
    spec's resources.in_process."""
    log_every: int = Field(50, ge=1)
    """Log train metrics and the console progress line every N steps."""
    resume: bool = True
    """Rerunning the same config resumes its run (same run.name); False starts a fresh run."""
    stop_at: dict[str, float] = Field(default_factory=dict)
    """Stop early once one probe reaches all of these figures (metric -> threshold, reached at >=),
    e.g. {val/acc: 0.999}: the paper's DisLib rule. Probes run beside training, so the run ends at
    the first checkpoint after the probe that reached them; optim.steps is then the cap."""
    stop_wait: bool = False
    """With run.stop_at: training waits at each probed checkpoint for that checkpoint's probe, as the
    public DisLib code validates after every epoch, so the run ends at the checkpoint that reached
    stop_at. Without it, a probe slower than the steps between checkpoints (a whole-split probe)
    falls behind and training goes on for as many checkpoints as it lags, each one queued for a
    probe. The cost is the probe's time at each checkpoint, when training pauses (the probe has the
    CPUs meanwhile). `linrep reproduce dislib` sets it."""
    report_poll_s: float = Field(0.2, gt=0, le=60)
    """How often Ray Train's controller collects the workers' reports (Ray's
    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default). A worker blocks on its second uncollected
    report, so Ray's default caps a run at one checkpoint per 2 s: measured 2.0 s per 50-step
    checkpoint when the 50 steps took 0.8 s."""

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, v):
        """run.name=../../etc would put the run folder outside run.storage; a quote breaks MLflow's filter."""
        return _safe_name(v)


class TrackingConfig(_Section):
    uri: str | None = None
    """MLflow tracking URI; None = $MLFLOW_TRACKING_URI or sqlite ./mlruns/mlflow.db."""
    experiment: str | None = None
    """MLflow experiment; None = synthetic / dislib-<dataset> / imagenet."""
    enabled: bool = True
    """Log to MLflow at all."""
    # -- what the MLflow UI shows besides params and metrics (trainer/model_logging.py) --
    register_model: str | None = None
    """Register the run's best-by-probe classifier (the final one when no probe ran) as a version of
    this MLflow registered model; None = log the models without registering them."""
    outage_wait_s: float = Field(90.0, ge=0)
    """Seconds the end of a run waits out a tracking store that is away (a server restart takes
    seconds to a minute): rank 0's last metric writes, the probe actor's last figures and the
    driver's final run status are retried that long, then given up with a warning (the training and
    its checkpoints are kept either way)."""
    log_models: bool | None = None
    """Log the run's classifiers (the final one, and the best by the probe headline) as MLflow
    models when it ends. None = yes for a run; in a sweep, only the best child run's, logged when
    the sweep ends (each trial's took 2-5 s of a few-second trial). true/false: every run, or none."""
    system_metrics_s: float = Field(10.0, ge=0)
    """Seconds between samples of CPU, memory and GPU use logged as system/* metrics; 0 = off."""

    @field_validator("experiment")
    @classmethod
    def _experiment_is_safe(cls, v):
        return _safe_name(v, experiment=True)

    @field_validator("register_model")
    @classmethod
    def _model_name_is_safe(cls, v):
        return _safe_name(v)


class ProbeConfig(_Section):
    enabled: bool = True
    """Probe each checkpoint with a probe actor while training goes on."""
    samples: int = Field(8192, ge=16)
    """Synthetic: held-out DGP samples (split in halves: fit / score)."""
    max_train_samples: int = Field(20000, ge=0)
    """Image datasets: training-split samples used to fit decoders (>= 10). 0 = the whole training
    split, fitted by streamed normal equations (X^T X and X^T y accumulated batch by batch in float64,
    solved once: memory p x p, not n x p), as `linrep reproduce dislib` does; the raw-pixel baseline
    is fitted the same way on the same split."""
    max_eval_samples: int = Field(10000, ge=0)
    """Image datasets: samples of the scoring split (probe.score_split) and of the validation split
    (val/acc) used to score decoders (>= 10); 0 = the whole split."""
    score_split: Literal["val", "test"] = "val"
    """Image datasets: the split the factor decoders are scored on (val/acc, and with it run.stop_at,
    always comes from the validation split). `linrep reproduce dislib` scores on test."""
    actor_cpus: float = Field(0.0, ge=0)
    """CPUs reserved by the probe actor (0 = shares the workers' CPUs)."""
    actor_gpus: float = Field(0.0, ge=0)
    """GPU share of the probe actor."""
    actor_resources: dict[str, float] = Field(default_factory=dict)
    """Ray custom resources the probe actor asks for, to pin it to a node: e.g. {bed_head: 1} puts it
    on the head of infra/local/bed.sh, {probe_node: 1} on a node started with that resource. Only
    placement: not part of the run's fingerprint."""
    every: int = Field(1, ge=1)
    """Probe every n-th checkpoint."""
    max_attempts: int = Field(2, ge=1)
    """Attempts at one checkpoint's probe when it kills the probe actor (out of memory, a crash);
    past them the checkpoint is recorded as failed (MLflow tag linrep.probe_failed.<step>) and the
    next one is probed."""
    drain_timeout_s: float = Field(3600.0, gt=0)
    """Seconds the end of a run waits for the probes still queued; past them a warning names the
    checkpoints left unprobed and the run finishes."""


class Config(_Section):
    """The whole run: data, model, optimisation, run, tracking and probe sections."""

    data: DataConfig = Field(default_factory=DataConfig)
    """Data: which dataset and its generating process / label scheme."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """Model: encoder f and head W."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimisation."""
    run: RunConfig = Field(default_factory=RunConfig)
    """Execution: workers, seeds, checkpoints."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow."""
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    """Linear probes of checkpoints."""
    preset: str | None = None
    """Name of the preset this config started from (informational)."""

    # ---- derived values -------------------------------------------------------------------
    @property
    def data_seed(self) -> int:
        return self.run.seed if self.data.seed is None else self.data.seed

    @property
    def is_synthetic(self) -> bool:
        return self.data.dataset == SYNTHETIC

    @property
    def unit_features(self) -> bool:
        return self.model.case in ("C1", "C2") if self.model.case else self.model.normalize_features

    @property
    def unit_weights(self) -> bool:
        return self.model.case in ("C1", "C3") if self.model.case else self.model.normalize_weights

    @property
    def experiment_name(self) -> str:
        if self.tracking.experiment:
            return self.tracking.experiment
        if self.is_synthetic:
            return "synthetic"
        return "imagenet" if self.data.dataset == "imagenet" else f"dislib-{self.data.dataset}"

    def fingerprint(self) -> str:
        """Short hash of everything but run.name/run.resume and tracking: names a run for resume."""
        d = self.model_dump(mode="json")
        d["run"].pop("name", None)
        d["run"].pop("resume", None)
        d["run"].pop("in_process", None)  # where it trains, not what: a rerun may switch
        if not d["run"].get("stop_wait"):    # runs named before the field existed keep their names
            d["run"].pop("stop_wait", None)
        d.pop("tracking", None)
        d["probe"].pop("actor_resources", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def run_name(self) -> str:
        """run.name, or <preset>-<hash>: a config file's stem may hold characters a name does not take."""
        if self.run.name:
            return self.run.name
        return f"{safe_name_part(self.preset or 'run')[:NAME_MAX - 9]}-{self.fingerprint()}"

    # ---- cross-field checks ---------------------------------------------------------------
    def check(self) -> "Config":
        """Cross-field checks; each error names the keys involved and the fix."""
        d, o, r = self.data, self.optim, self.run
        if self.is_synthetic:
            if d.labels not in ("class", "instance"):
                raise ConfigError(f"data.labels={d.labels}: the synthetic DGP takes class or instance")
            if d.labels == "instance" and d.num_instances < d.num_classes:
                raise ConfigError(
                    f"data.num_instances={d.num_instances} < data.num_classes={d.num_classes}: "
                    "DIET needs at least one instance per class (num_instances >= num_classes)")
            if self.model.case == "C3" and d.labels == "instance" and d.num_classes < 2 * d.dim:
                raise ConfigError(
                    f"model.case=C3 needs data.num_classes >= 2*data.dim (= {2 * d.dim}), got {d.num_classes}")
            if self.model.feature_dim not in (None, d.dim):
                raise ConfigError(f"model.feature_dim={self.model.feature_dim}: synthetic encoders output "
                                  f"data.dim={d.dim} (leave feature_dim unset)")
        else:
            if d.root is None:
                raise ConfigError(f"data.root is required for data.dataset={d.dataset}: "
                                  f"point it at the shards written by `linrep data`")
            allowed = ("imagenet",) if d.dataset == "imagenet" else ("class", "factor", "partition", "instance")
            if d.labels not in allowed:
                raise ConfigError(f"data.labels={d.labels}: data.dataset={d.dataset} takes {' | '.join(allowed)}")
        if o.batch_size % r.workers:
            raise ConfigError(f"optim.batch_size={o.batch_size} must be divisible by run.workers={r.workers}")
        if o.warmup_steps >= o.steps:
            raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be < optim.steps={o.steps}")
        if o.zero_stage and o.engine != "deepspeed":
            raise ConfigError(f"optim.zero_stage={o.zero_stage} needs optim.engine=deepspeed")
        if o.precision == "bf16" and not r.use_gpu:
            raise ConfigError("optim.precision=bf16 needs run.use_gpu=true (CPU training runs fp32)")
        if o.grad_accum > 1 and o.engine != "deepspeed":
            raise ConfigError("optim.grad_accum > 1 needs optim.engine=deepspeed")
        for key in ("max_train_samples", "max_eval_samples"):
            if 0 < getattr(self.probe, key) < 10:
                raise ConfigError(f"probe.{key}={getattr(self.probe, key)}: must be >= 10, or 0 for the whole split")
        if r.stop_at and not self.probe.enabled:
            raise ConfigError(f"run.stop_at={r.stop_at} needs probe.enabled=true (the probe actor computes the figures)")
        bad = [k for k in r.stop_at if not k.startswith(("probe/", "val/"))]
        if bad:
            raise ConfigError(f"run.stop_at: {bad[0]} is not a probe figure (probe/... or val/..., "
                              "see the README's metric names)")
        if r.stop_wait and not r.stop_at:
            raise ConfigError("run.stop_wait=true waits for probes to apply run.stop_at, which is empty: "
                              "set run.stop_at (e.g. {val/acc: 0.999}) or drop run.stop_wait")
        from trainer.memory import check_memory  # last: it names the key that makes the need too large

        check_memory(self)
        return self

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The config as written to disk and MLflow (config.yaml, checkpoints): credentials redacted."""
        return yaml.safe_dump(self.to_shareable_dict(), sort_keys=False)

    def flatten(self) -> dict[str, Any]:
        """{'data.dim': 5, ...}: MLflow params (credentials redacted)."""
        return dict(_flatten(self.to_shareable_dict()))

    def to_shareable_dict(self) -> dict[str, Any]:
        """to_dict() with the tracking URI's user:password part replaced by *** (a URI such as
        postgresql://user:pw@db/mlflow must not reach params, config.yaml or checkpoints)."""
        d = self.to_dict()
        if d["tracking"].get("uri"):
            d["tracking"]["uri"] = redact_uri(d["tracking"]["uri"])
        return d


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


# ---- key lookup ------------------------------------------------------------------------------
def config_field(key: str) -> FieldInfo:
    """The pydantic field of a dotted config key ('data.kappa'); ConfigError naming what exists."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"'{key}' must name a section and a field, e.g. data.num_classes")
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"'{key}' is not a config key ({where} has: {', '.join(model.model_fields)})")
        section = _section_model(field.annotation)
        last = i == len(parts) - 1
        if len(parts) < 2:  # a top-level name that exists: a section (or `preset`), not a key to set
            raise ConfigError(f"'{key}' must name a section and a field, e.g. data.num_classes")
        if last and section is not None:
            raise ConfigError(f"'{key}' is a config section; name one of its fields "
                              f"({', '.join(section.model_fields)})")
        if not last:
            if section is None:
                raise ConfigError(f"'{key}': {'.'.join(parts[:i + 1])} is a value, not a section")
            model = section
    return field


def _section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


# ---- validation ------------------------------------------------------------------------------
def _pydantic_error(err: ValidationError) -> ConfigError:
    """The first pydantic error as one line naming the key."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        try:
            config_field(key)
        except ConfigError as unknown:
            return unknown
    got = e.get("input")
    if isinstance(got, (dict, list)):
        got = json.dumps(got)[:60]
    elif isinstance(got, str) and len(got) > 60:
        got = got[:57] + "..."
    problem = _lower_first(str(e["msg"]))  # not .lower(): "input should be 'C1', 'C2'..." keeps its case
    if e["type"] == "finite_number":
        problem = f"must be a finite number (inf and nan are refused){_default_hint(key)}"
    return ConfigError(f"config key '{key}' = {got!r}: {problem}", problem=problem)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _default_hint(key: str) -> str:
    """'; the default is 0.001' for a key with a finite default, else ''."""
    try:
        default = config_field(key).default
    except ConfigError:  # e.g. run.stop_at.val/acc: a value inside a mapping
        return ""
    ok = isinstance(default, (int, float)) and not isinstance(default, bool) and math.isfinite(default)
    return f"; the default is {default}" if ok else ""


def from_dict(raw: dict[str, Any], *, cross_checks: bool = True) -> Config:
    """Validate a raw dict into a Config (raises ConfigError).

    cross_checks=False checks each field alone: what a sweep needs to judge one value of an axis
    before the rest of a trial exists.
    """
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise _pydantic_error(err) from None
    return cfg.check() if cross_checks else cfg


# ---- overrides -------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[list[str], Any]:
    """'optim.lr=3e-3' -> (['optim', 'lr'], 0.003); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key.sub=value")
    key, _, text = item.partition("=")
    path = key.strip().split(".")
    if not all(path) or len(path) < 2:
        raise ConfigError(f"override key '{key}' must name a section and a field, e.g. optim.lr=3e-3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if isinstance(value, str):
        # YAML 1.1 reads 1e-3 as a string; accept scientific notation as a number.
        try:
            value = float(value)
        except ValueError:
            pass
    return path, value


Overrides = Iterable[str] | Mapping[str, Any]


def apply_overrides(raw: dict[str, Any], overrides: Overrides) -> dict[str, Any]:
    """A copy of `raw` with the overrides set: "key.sub=value" items, or a {key.sub: value} mapping
    (values already parsed, e.g. a sweep's trial). Unknown keys are caught by validation."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    if isinstance(overrides, Mapping):
        items = [(key.split("."), value, key) for key, value in overrides.items()]
    else:
        items = [(*parse_override(item), item) for item in overrides]
    for path, value, item in items:
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return raw


# ---- sources ---------------------------------------------------------------------------------
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err.__class__.__name__}") from None
    if raw is None:  # an empty file would silently train every default: almost surely a mistake
        raise ConfigError(f"config file {path} is empty: start it with `base: <preset>` (linrep presets) "
                          "and the sections you change")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def load_raw(source: str | Path, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset name or a YAML file -> raw dict (presets may `base:` on another preset)."""
    source = str(source)
    key = str(Path(source).resolve()) if Path(source).is_file() else source
    if key in _chain:
        raise ConfigError(f"config 'base:' loops back to {source}; point base at a preset (linrep presets)")
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        raw = read_yaml(path)
        name = path.stem
    elif (PRESET_DIR / f"{source}.yaml").exists():
        raw = read_yaml(PRESET_DIR / f"{source}.yaml")
        name = source
    else:
        raise ConfigError(f"unknown preset or file '{source}' (presets: {', '.join(list_presets())})")
    base = raw.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"config key 'base' in {source} must be a preset name or a file, got {type(base).__name__}")
    merged = _deep_merge(load_raw(base, (*_chain, key)), raw) if base else raw
    merged["preset"] = raw.get("preset") or name
    return merged


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---- the entry point -------------------------------------------------------------------------
def resolve(source: str | Path | Mapping[str, Any], overrides: Overrides | None = None, *,
            cross_checks: bool = True) -> Config:
    """The one entry point: a preset name, a YAML path or a raw dict, plus overrides -> a Config.

    overrides: ["optim.lr=3e-3", ...] as typed on a command line, or {"optim.lr": 0.003, ...}.
    Raises ConfigError (one line naming the key) for anything the config refuses.
    """
    raw = dict(source) if isinstance(source, Mapping) else load_raw(source)
    return from_dict(apply_overrides(raw, overrides or []), cross_checks=cross_checks)


load_config = resolve  # the name most callers (CLI, benchmarks, tests) use


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML, atomically (a reader never sees half of it)."""
    write_text_atomic(path, cfg.to_yaml())
