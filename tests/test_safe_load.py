"""No code runs on resume: every checkpoint file linrep reads (model.pt, train_state.pt, DeepSpeed's
model states and ZeRO shards) goes through torch.load(weights_only=True); a file that carries code
is refused in one line naming the checkpoint folder, and the code never runs (a marker file it
would create never appears). Real engines: the torch engine in-process, real DeepSpeed (cpu
accelerator, gloo, one process) in a subprocess, and the real CLI for the resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_linrep
from trainer.checkpoint import PRUNED_MARKER, list_checkpoints, make_meta, write_checkpoint
from trainer.config import load_config
from trainer.engine import TorchEngine
from trainer.errors import UserError
from trainer.models import InputSpec, build_classifier
from trainer.safe_load import check_checkpoint


class Exploit:
    """Unpickles to os.system("touch MARKER"): a stand-in for arbitrary code in a hostile file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft(checkpoint: Path, marker: Path, only: str | None = None) -> list[str]:
    """Replace each .pt file (or just `only`) by a torch archive carrying code; meta.json's sizes are
    updated so the folder still looks complete. Returns the replaced names."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    names = [n for n in meta["files"] if n.endswith(".pt") and (only is None or n == only)]
    for name in names:
        torch.save({"w": Exploit(marker)}, checkpoint / name)
        meta["files"][name] = (checkpoint / name).stat().st_size
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    return names


def torch_checkpoint(path: Path) -> tuple[TorchEngine, Path]:
    cfg = load_config("synthetic-supervised", ["model.hidden=[8]"])
    engine = TorchEngine(build_classifier(cfg, InputSpec(dim=5), 100), cfg.optim, torch.device("cpu"))
    write_checkpoint(engine, cfg, make_meta(10, 0, 100, InputSpec(dim=5)), path)
    return engine, path


@pytest.mark.parametrize("victim", ["model.pt", "train_state.pt"])
def test_torch_engine_refuses_a_checkpoint_that_carries_code(tmp_path, victim):
    engine, ckpt = torch_checkpoint(tmp_path / "checkpoint_00000010")
    assert engine.load(ckpt) == {"step": 10}  # an untouched checkpoint loads
    marker = tmp_path / "MARKER"
    craft(ckpt, marker, only=victim)
    for load in (engine.load, check_checkpoint):  # the worker's load and the driver's check
        with pytest.raises(UserError) as err:
            load(ckpt)
        line = str(err.value)
        assert "\n" not in line and str(ckpt) in line and "non-tensor objects" in line and victim in line
        assert "posix.system" in line
    assert not marker.exists()


DEEPSPEED_SCRIPT = """
import os, sys, json, torch
from pathlib import Path
from linrep.bench.gpu_check import init_single_process_group
from tests.test_safe_load import craft
from trainer.config import load_config
from trainer.engine import DeepSpeedEngine, deepspeed_safe_classes
from trainer.errors import UserError
from trainer.loop import train_step
from trainer.models import InputSpec, build_classifier
from trainer.safe_load import DEEPSPEED_CLASS_NAMES, check_checkpoint

out = Path(sys.argv[1])
init_single_process_group(torch.device("cpu"))
assert [f"{c.__module__}.{c.__qualname__}" for c in deepspeed_safe_classes()] == list(DEEPSPEED_CLASS_NAMES)
def engine(cfg):
    torch.manual_seed(0)
    return DeepSpeedEngine(build_classifier(cfg, InputSpec(dim=5), 10), cfg.optim, torch.device("cpu"),
                           micro_batch=4, bf16=False)
for stage, learn in ((1, "false"), (2, "true")):          # ZeRO-1 and ZeRO-2 shards; a learned β under DeepSpeed
    cfg = load_config("synthetic-supervised", ["model.hidden=[8]", "optim.engine=deepspeed", "optim.batch_size=4",
                                               f"optim.zero_stage={stage}", f"model.learn_temperature={learn}"])
    trained = engine(cfg)
    train_step(trained, torch.randn(4, 5), torch.randint(0, 10, (4,)), 0.0)
    ckpt = out / f"checkpoint-zero{stage}"
    ckpt.mkdir()
    trained.save(ckpt, {"step": 1})
    (ckpt / "meta.json").write_text(json.dumps({"step": 1, "files": {str(p.relative_to(ckpt)): p.stat().st_size
                                                                   for p in ckpt.rglob("*.pt")}}))
    check_checkpoint(ckpt)
    fresh = engine(cfg)
    assert fresh.load(ckpt)["step"] == 1                      # weights-only, with DeepSpeed's allow-listed classes
    a, b = trained.ds.module.state_dict(), fresh.ds.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    shards = sorted(str(p.relative_to(ckpt)) for p in (ckpt / "ds").glob("*.pt"))
    assert any("optim_states" in s for s in shards), shards    # ZeRO's optimiser shard is among them
    pristine = {s: (ckpt / s).read_bytes() for s in shards}
    for shard in shards:                                       # each DeepSpeed file, one at a time
        craft(ckpt, out / "MARKER", only=shard)
        try:
            engine(cfg).load(ckpt)
            raise SystemExit(f"{shard}: loaded")
        except UserError as err:
            line = str(err)
            assert "\\n" not in line and str(ckpt) in line and "non-tensor objects" in line and shard in line, line
        (ckpt / shard).write_bytes(pristine[shard])
    print(f"zero{stage} refused:", " ".join(shards))
"""


def test_deepspeed_engine_loads_weights_only_and_refuses_code(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for stage in (1, 2):
        assert f"zero{stage} refused: ds/mp_rank_00_model_states.pt ds/zero_pp_rank_0_mp_rank_00_optim_states.pt" \
            in out.stdout, out.stdout[-2000:]
    assert not (tmp_path / "MARKER").exists()


def test_resume_from_a_crafted_deepspeed_checkpoint_is_one_line(tmp_path, shared_ray):
    """Train (DeepSpeed ZeRO-1, one worker) to a checkpoint, replace every .pt file by one carrying
    code, rerun the same command: exit 2, one line naming the folder, the code never ran."""
    args = ["train", "synthetic-supervised", "optim.engine=deepspeed", "optim.zero_stage=1", "optim.steps=30",
            "optim.warmup_steps=1", "run.checkpoint_every=10", "run.workers=1", "probe.enabled=false",
            "run.keep_checkpoints=1", "model.learn_temperature=false", "model.hidden=[16]",
            "data.generator_pool=200", "optim.batch_size=64", "run.name=crafted"]
    # the first run joins the session's Ray (shared_ray): only its checkpoints matter here
    first = run_linrep(args, cwd=tmp_path, timeout=600, env=shared_ray)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "ray_results" / "crafted"
    # retention without a probe actor: run.keep_checkpoints=1 leaves the newest complete, the others pruned
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint_00000030"]
    assert all((run_dir / f"checkpoint_{s:08d}" / PRUNED_MARKER).is_file() for s in (10, 20))
    ckpt = run_dir / "checkpoint_00000030"
    marker = tmp_path / "MARKER"
    assert sorted(craft(ckpt, marker)) == ["ds/mp_rank_00_model_states.pt",
                                           "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "model.pt"]
    again = run_linrep(args, cwd=tmp_path, timeout=300, env=shared_ray)
    assert again.returncode == 2, again.stderr[-3000:]
    lines = [l for l in again.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and str(ckpt) in lines[0] and "non-tensor objects" in lines[0], lines
    assert not marker.exists()
