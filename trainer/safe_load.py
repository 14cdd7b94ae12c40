"""Reading checkpoint files without running code: every .pt file linrep reads goes through
torch.load(weights_only=True).

A run folder may live on shared storage or in a bucket that others can write. A pickle can carry
code (`__reduce__` -> os.system), and plain torch.load runs it; DeepSpeed 0.19's own loader does
exactly that (TorchCheckpointEngine.load: weights_only=False). The weights-only unpickler builds
tensors, containers and numbers only, plus the classes allow-listed here by full name:

- the three plain-data classes DeepSpeed's ZeRO-1/2 optimiser shards hold (found by listing the
  pickle globals of fp32 shards, stages 0-2, on the CPU; bf16 shards hold the same ones by
  DeepSpeed's source: CreateLossScaler gives bf16 a static LossScaler, and BF16_Optimizer keeps
  the same fragment_address slice mappings; not yet run on a GPU). None defines __reduce__, __setstate__ or
  __new__: the unpickler calls object.__new__ and fills __dict__ (LossScaler, fragment_address) or
  looks an int up in an Enum (ZeroStageEnum). A hostile file can set their fields, never run code.
  DynamicLossScaler (fp16 only) is left out: linrep never trains in fp16.

The driver checks the checkpoint a run resumes from before Ray starts (`check_checkpoint`), so a
crafted folder ends the command in one line; the workers load through the same unpickler anyway
(trainer/engine.py), so a file swapped after the check is refused too.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from trainer.errors import UserError

# Full names of the non-tensor classes DeepSpeed 0.19 pickles into ZeRO-1/2 checkpoints (see above).
DEEPSPEED_CLASS_NAMES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointFile(UserError):
    """A checkpoint file the weights-only unpickler refused (it asks for code or foreign classes)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint file {path} holds non-tensor objects ({reason})")
        self.path, self.reason = Path(path), reason


_BOILERPLATE = ("Weights only load failed", "Check the documentation", "(1)", "(2)", "Please", "In PyTorch")


def refused_reason(err: Exception) -> str:
    """The line of torch's long 'Weights only load failed' message that names what was refused
    (e.g. 'Trying to load unsupported GLOBAL posix.system whose module posix is blocked.')."""
    lines = [l.strip().removeprefix("WeightsUnpickler error: ") for l in str(err).splitlines() if l.strip()]
    named = [l for l in lines if not l.startswith(_BOILERPLATE)]
    return (named[0].split(". Please use")[0] if named else err.__class__.__name__)[:160]


def load_file(path: Path | str, *, map_location: Any = "cpu", allowed: Iterable = (), mmap: bool = False) -> Any:
    """torch.load(weights_only=True) with `allowed` (classes, or (stand-in, full name) pairs)
    accepted besides tensors. A pickle asking for anything else raises UnsafeCheckpointFile,
    and nothing in it runs."""
    try:
        with torch.serialization.safe_globals(list(allowed)), warnings.catch_warnings():
            # a raw pickle (not torch's zip) makes torch warn about its protocol before refusing it:
            # the refusal is the one line the user sees
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointFile(Path(path), refused_reason(err)) from None


class _StandIn:
    """Takes the place of an allow-listed DeepSpeed class while the driver checks a checkpoint:
    the driver never imports DeepSpeed (11 s, and an accelerator banner), and a stand-in runs nothing."""

    def __init__(self, *args: Any):
        self.args = args


def check_checkpoint(directory: Path) -> None:
    """Unpickle every .pt file of a checkpoint weights-only, tensors memory-mapped (not read);
    raise a one-line UserError naming the folder when one holds non-tensor objects."""
    directory = Path(directory)
    stand_ins = [(_StandIn, name) for name in DEEPSPEED_CLASS_NAMES]
    for path in sorted(directory.rglob("*.pt")):
        try:
            load_file(path, allowed=stand_ins, mmap=zipfile.is_zipfile(path))  # mmap needs torch's zip format
        except UnsafeCheckpointFile as err:
            raise UserError(f"checkpoint {directory} holds non-tensor objects ({path.relative_to(directory)}: "
                            f"{err.reason}); refusing to resume from it: delete it or restore a trusted copy") from None
        except Exception as err:  # truncated or garbled (meta.json's sizes match): refused as well
            first = str(err).strip().splitlines()[0][:140] if str(err).strip() else err.__class__.__name__
            raise UserError(f"checkpoint {directory}: {path.relative_to(directory)} cannot be read ({first})") from None


_CHECKED: set[str] = set()  # newest checkpoints this process found safe


def check_resume_checkpoint(run_dir) -> None:
    """The checkpoint a rerun will resume from (the newest complete one in the run folder) is checked
    on the driver, before Ray starts and before the MLflow run is touched."""
    from trainer.checkpoint import list_checkpoints
    from trainer.storage import locate

    location = locate(run_dir)
    complete = list_checkpoints(location) if location.is_dir() else []
    if complete and str(complete[-1]) not in _CHECKED:  # the driver checks before Ray, then again in prepare_run
        with complete[-1].local_copy() as local:  # the folder itself, or a download from an object store
            check_checkpoint(local)
        _CHECKED.add(str(complete[-1]))
