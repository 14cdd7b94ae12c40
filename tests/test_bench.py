"""`linrep bench`: JSON results, the closing ratio line, MLflow logging and the README table.

Fast tests run real benchmarks that need no Ray (scaling through plain torch DDP, forced with
LINREP_BENCH_NO_RAY=1) and the pieces every benchmark shares; the slow test runs every benchmark
with --quick through the real CLI (real Ray Train, real shards, real MLflow store). No timing
asserts: the figures depend on the machine and its load.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from linrep.bench import harness, readme
from linrep.bench.harness import BenchResult, load_results, save_result
from linrep.bench.identifiability import first_streak, numpy_vmf
from tests.conftest import LINREP

RATIO_LINE = re.compile(r"^(\w+): ratio (nan|[-+0-9.e]+) \(target (>=|<=) [0-9.e+-]+\)$")


def run_bench(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*LINREP, "bench", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def fake_result(name: str = "overhead", ratio: float = 0.9, gpu: str | None = None) -> BenchResult:
    machine = {"cpu": "Test CPU", "usable_cpus": 2, "torch": torch.__version__, "device": "cpu"}
    if gpu:
        machine.update(gpu=gpu, device="cuda")
    return harness.make_result(name, ratio, f"{name} summary | with a pipe", figures={"a_s": 1.5, "b": float("nan")},
                               machine=machine, load={"before": [1.0, 1.0, 1.0], "after": [2.0, 2.0, 2.0]})


# ---- shared pieces ------------------------------------------------------------------------------
def test_ratio_line_format_and_target_direction():
    r = fake_result("overhead", 0.912)
    assert RATIO_LINE.match(r.ratio_line()), r.ratio_line()
    assert r.ratio_line() == "overhead: ratio 0.912 (target >= 0.85)" and r.met
    slow = fake_result("identifiability", 0.35)       # target <= 0.1: a larger ratio misses it
    assert slow.ratio_line() == "identifiability: ratio 0.35 (target <= 0.1)" and not slow.met
    missing = fake_result("probes", float("nan"))
    assert RATIO_LINE.match(missing.ratio_line()) and not missing.met


def test_results_are_json_with_nan_as_null_and_gpu_results_kept_apart(tmp_path):
    cpu, gpu = fake_result("scaling", 0.7), fake_result("scaling", 0.5, gpu="NVIDIA H100 80GB HBM3")
    p1, p2 = save_result(cpu, tmp_path), save_result(gpu, tmp_path)
    assert p1.name == "scaling.json" and p2.name == "scaling.nvidia-h100-80gb-hbm3.json"
    data = json.loads(p1.read_text())
    assert data["figures"]["b"] is None and data["met"] is False and data["ratio_line"].startswith("scaling: ratio 0.7")
    assert [d["ratio"] for d in load_results(tmp_path)] == [0.7, 0.5]  # CPU first, then the accelerator
    history = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(history) == 2 and json.loads(history[0])["name"] == "scaling"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_a_broken_result_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "overhead.json").write_text("{not json")
    with pytest.raises(harness.UserError, match="overhead.json: not a readable bench result"):
        load_results(tmp_path)
    (tmp_path / "overhead.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(harness.UserError, match="not a bench result"):
        load_results(tmp_path)


def test_first_streak_needs_three_consecutive_probes():
    pts = [(100, 0.991, 1.0), (200, 0.985, 2.0), (300, 0.990, 3.0), (400, 0.993, 4.0), (500, 0.995, 5.0)]
    assert first_streak(pts, 0.99, 3) == (300, 0.990, 3.0)
    assert first_streak(pts[:4], 0.99, 3) is None
    assert first_streak([], 0.99, 3) is None


def test_numpy_vmf_of_the_baseline_is_exact():
    """The baseline's host sampler must be a real vMF (else the comparison is unfair)."""
    from scipy.special import ive

    rng = np.random.default_rng(0)
    d, kappa = 5, 10.0
    mu = np.zeros((200_000, d))
    mu[:, 2] = 1.0
    z = numpy_vmf(mu, kappa, rng)
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-9)
    expected = ive(d / 2, kappa) / ive(d / 2 - 1, kappa)  # mean resultant length A_d(κ)
    assert z[:, 2].mean() == pytest.approx(expected, rel=0.005)
    assert np.abs(np.delete(z, 2, axis=1).mean(0)).max() < 0.01


def test_sweep_floor_probes_where_a_trial_would_and_runs_each_trials_steps():
    from linrep.bench.sweep import floor_seconds, plan_configs, probe_steps

    assert probe_steps(150, 75, 1) == [75, 150]
    assert probe_steps(100, 30, 2) == [60, 100]  # checkpoints 30 60 90 100: every 2nd, and the last
    configs = plan_configs(quick=True)
    assert len(configs) == 3 and all(c["optim"]["steps"] > 0 for _, c in configs)
    floor = floor_seconds(configs[:1])
    (key, cfg), figures = configs[0], floor[configs[0][0]]
    assert figures["steps"] == cfg["optim"]["steps"] and figures["probes"] == len(
        probe_steps(cfg["optim"]["steps"], cfg["run"]["checkpoint_every"], cfg["probe"]["every"]))
    assert figures["train_s"] > 0 and figures["probe_s"] > 0


def test_unknown_benchmark_is_one_line_exit_2(tmp_path):
    out = run_bench(["nosuch", "--out", str(tmp_path / "r"), "--no-mlflow"], cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert "unknown benchmark 'nosuch'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r" / "nosuch.json").exists()


# ---- README ----------------------------------------------------------------------------------------
def test_readme_block_is_replaced_between_markers(tmp_path):
    save_result(fake_result("overhead", 0.93), tmp_path / "res")
    save_result(fake_result("identifiability", 0.4), tmp_path / "res")
    md = tmp_path / "README.md"
    md.write_text(f"# x\n\nintro\n\n## Performance\n\n{readme.START}\nold table\n{readme.END}\n\n## After\nkept\n")
    text = readme.update_readme(tmp_path / "res", md)
    assert "old table" not in text and text.endswith("## After\nkept\n") and text.startswith("# x\n\nintro")
    block = text.split(readme.START)[1].split(readme.END)[0]
    rows = [ln for ln in block.splitlines() if ln.startswith("| identifiability") or ln.startswith("| overhead")]
    assert rows[0].startswith("| identifiability | 0.4 | <= 0.1 | no |")  # benchmark order, then met?
    assert rows[1].startswith("| overhead | 0.93 | >= 0.85 | yes |")
    assert "summary \\| with a pipe" in rows[1]  # pipes escaped: the table stays a table
    assert "Past one node" in block
    again = readme.update_readme(tmp_path / "res", md)
    assert again == text  # idempotent


def test_readme_without_markers_gets_a_performance_section(tmp_path):
    save_result(fake_result("probes", 0.95), tmp_path / "res")
    md = tmp_path / "README.md"
    md.write_text("# project\n\nno markers here")
    out = subprocess.run([sys.executable, "-m", "linrep.bench.readme", "--out", str(tmp_path / "res"),
                          "--readme", str(md)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = md.read_text()
    assert text.startswith("# project\n\nno markers here\n\n## Performance\n\n" + readme.START)
    assert text.rstrip().endswith(readme.END) and "| probes | 0.95 | >= 0.9 | yes |" in text


def test_readme_with_a_lone_marker_is_refused(tmp_path):
    md = tmp_path / "README.md"
    md.write_text(f"# x\n{readme.START}\nno end\n")
    with pytest.raises(harness.UserError, match="broken bench block"):
        readme.update_readme(tmp_path, md)
    assert md.read_text() == f"# x\n{readme.START}\nno end\n"  # untouched


# ---- a real benchmark, end to end --------------------------------------------------------------
def test_quick_scaling_without_ray_writes_json_logs_mlflow_and_ends_with_the_ratio_line(tmp_path):
    """Real torch DDP processes (gloo), a real sqlite MLflow store; the CLI's output contract."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    out = run_bench(["scaling", "--quick", "--out", str(tmp_path / "res")], cwd=tmp_path,
                    env={"LINREP_BENCH_NO_RAY": "1", "MLFLOW_TRACKING_URI": uri}, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert RATIO_LINE.match(lines[-1]) and lines[-1].startswith("scaling: ratio ")
    assert any(ln.startswith("machine: ") and "usable CPUs" in ln for ln in lines)  # the machine is printed
    data = json.loads((tmp_path / "res" / "scaling.json").read_text())
    assert data["name"] == "scaling" and data["quick"] is True and data["details"]["runner"] == "torch-ddp-gloo"
    assert data["figures"]["samples_per_s_1w"] > 0 and data["figures"]["samples_per_s_2w"] > 0
    assert math.isclose(data["ratio"], data["figures"]["samples_per_s_2w"] / (2 * data["figures"]["samples_per_s_1w"]))
    assert len(data["load"]["before"]) == 3 and data["machine"]["logical_cpus"] >= 1
    # MLflow: one run in experiment `bench` with the ratio and the JSON as an artifact
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["ratio"] == pytest.approx(data["ratio"])
    assert runs[0].data.tags["linrep.bench"] == "scaling"
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["scaling.json"]
    assert not (tmp_path / "README.md").exists()  # --quick never rewrites a README


def test_the_sweep_benchmark_reads_trial_times_through_the_ledgers(tmp_path):
    """trial_walls / trials_span come from tune.folder's ledgers (every attempt of every trial)."""
    from linrep.bench.sweep import trial_walls, trials_span
    from tune.folder import TrialLedger, trial_attempts

    assert trial_attempts(tmp_path) == {} and np.isnan(trials_span(tmp_path))
    times = iter([100.0, 103.0, 110.0, 112.0, 101.0, 106.0])  # a: two attempts (3 s + 2 s), b: one (5 s)
    for key in ("a", "a", "b"):
        ledger = TrialLedger(tmp_path, key)
        ledger.start(None, 0)
        d = ledger.read()
        d["attempts"][-1]["start"] = next(times)
        ledger.path.write_json(d)
        ledger.end("finished")
        d = ledger.read()
        d["attempts"][-1]["end"] = next(times)
        ledger.path.write_json(d)
    TrialLedger(tmp_path, "c").mark_stopped()  # a marker file, not a ledger
    assert sorted(trial_attempts(tmp_path)) == ["a", "b"]
    assert sorted(trial_walls(tmp_path)) == [5.0, 5.0]
    assert trials_span(tmp_path) == 12.0


@pytest.mark.slow
def test_every_benchmark_quick_through_the_cli(tmp_path, shared_ray):
    """All six with --quick: real Ray Train runs, real shards, a real Ray Tune sweep (minutes)."""
    out = run_bench(["--quick", "--no-mlflow", "--out", str(tmp_path / "res")], cwd=tmp_path, env=shared_ray,
                    timeout=1700)
    ratio_lines = [ln for ln in out.stdout.splitlines() if RATIO_LINE.match(ln)]
    assert [RATIO_LINE.match(ln).group(1) for ln in ratio_lines] == harness.ORDER, out.stdout[-3000:] + out.stderr[-3000:]
    for name in harness.ORDER:
        data = json.loads((tmp_path / "res" / f"{name}.json").read_text())
        assert data["quick"] and not data["details"].get("error"), (name, data["details"].get("error"))
        assert data["ratio"] is not None and data["ratio"] > 0, name
    assert out.returncode == 0


# ---- the engine changes made for performance -------------------------------------------------------
def _classifier_and_engine(overrides: list[str], fused: bool = True):
    from trainer.config import load_config
    from trainer.engine import TorchEngine, lr_factor, make_optimizer
    from trainer.models import InputSpec, build_classifier

    cfg = load_config("synthetic-supervised", ["model.hidden=[16,16]", "optim.warmup_steps=2", *overrides])
    torch.manual_seed(0)
    engine = TorchEngine(build_classifier(cfg, InputSpec(dim=5), 100), cfg.optim, torch.device("cpu"))
    if not fused:
        engine.optimizer = make_optimizer(engine.module.parameters(), cfg.optim)
        engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lambda s: lr_factor(s, cfg.optim))
    return cfg, engine


def _fixed_gradients(engine, steps: int = 2) -> list[list[torch.Tensor]]:
    """Gradients of a few batches at the engine's initial weights (the same for both optimizers)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x, y = torch.randn(64, 5, generator=gen), torch.randint(100, (64,), generator=gen)
        loss = F.cross_entropy(engine.forward(x), y)
        out.append([g.detach().clone() for g in torch.autograd.grad(loss, list(engine.module.parameters()))])
    return out


def _updates(engine, gradients: list[list[torch.Tensor]]) -> torch.Tensor:
    """Parameter change after optimizer steps fed the given gradients (no forward pass between)."""
    params = list(engine.module.parameters())
    start = torch.cat([p.detach().flatten() for p in params]).clone()
    for grads in gradients:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        engine.optimizer.step()
    return torch.cat([p.detach().flatten() for p in params]) - start


def test_torch_engine_fuses_adam_without_changing_the_update():
    _, fused = _classifier_and_engine(["model.learn_temperature=true", "optim.warmup_steps=0"])
    _, plain = _classifier_and_engine(["model.learn_temperature=true", "optim.warmup_steps=0"], fused=False)
    assert fused.optimizer.param_groups[0]["fused"] is True and not plain.optimizer.param_groups[0].get("fused")
    # The same update rule, compared on the same gradients. Recomputing gradients after each step
    # lets rounding-level weight differences reach the next gradient, and Adam's early steps
    # (update ~ lr * g/|g|) turn those into lr-sized differences for near-zero gradients: that
    # failed at 6e-3 on an AMD EPYC while passing on Intel.
    grads = _fixed_gradients(plain)
    moved_fused, moved_plain = _updates(fused, grads), _updates(plain, grads)
    lr = fused.optimizer.param_groups[0]["lr"]
    assert lr > 0 and moved_plain.abs().max() > 0.5 * lr       # the steps really moved the weights
    assert torch.allclose(moved_fused, moved_plain, atol=1e-3 * lr, rtol=1e-4)


def test_torch_engine_bf16_autocast_only_when_asked():
    from trainer.engine import autocast_dtype

    cfg, engine = _classifier_and_engine([])
    assert engine.autocast is None and autocast_dtype(cfg.optim, torch.device("cuda")) is None  # auto stays fp32
    cfg.optim.precision = "bf16"  # the engine's side (the config allows bf16 only with a GPU today)
    assert autocast_dtype(cfg.optim, torch.device("cpu")) is torch.bfloat16
    from trainer.engine import TorchEngine
    from trainer.models import InputSpec, build_classifier

    bf = TorchEngine(build_classifier(cfg, InputSpec(dim=5), 100), cfg.optim, torch.device("cpu"))
    bf.module.load_state_dict(engine.module.state_dict())
    x = torch.randn(8, 5)
    low, full = bf.forward(x), engine.forward(x)
    assert low.dtype == torch.float32 and bf.module.encoder[0][0].weight.dtype == torch.float32  # fp32 master weights
    assert not torch.equal(low, full) and torch.allclose(low, full, atol=0.1, rtol=0.05)  # computed in bf16


# ---- the GPU check script, on the CPU -------------------------------------------------------------
GPU_CHECK_WITHOUT_RAY = """
import sys
sys.modules["ray"] = None     # the lent GPU machine has neither: importing them must not be needed
sys.modules["mlflow"] = None
from linrep.bench.gpu_check import main
sys.exit(main(sys.argv[1:]))
"""


def test_gpu_check_quick_runs_without_ray_or_mlflow(tmp_path):
    """The script sent to lent GPU machines, at tiny sizes on the CPU: real DeepSpeed ZeRO-2 (gloo),
    a real checkpoint rebuilt by load_classifier, the synthetic loop with its probe."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))}
    out = subprocess.run([sys.executable, "-c", GPU_CHECK_WITHOUT_RAY, "--quick", "--out", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("gpu-check: DeepSpeed ZeRO-2 / torch engine images/s ")
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    engines = {(e["encoder"], e["engine"], e["channels_last"]): e for e in data["engines"]}
    assert set(engines) == {("resnet10t", "deepspeed", False), ("resnet10t", "deepspeed", True),  # CPU: NCHW first
                            ("resnet10t", "ddp", False), ("resnet10t", "ddp", True),
                            ("vit_tiny_patch16_224", "deepspeed", False)}
    assert all(e["images_per_s"] > 0 and math.isfinite(e["loss"]) for e in engines.values())
    ckpt = data["checkpoint"]
    assert ckpt["complete"] and ckpt["step"] == 1 and ckpt["max_logit_diff"] < 1e-4  # fp32 on the CPU
    syn = data["synthetic"]
    assert syn["steps"] == 60 and len(syn["probes"]) == 3 and syn["final"]["probe/r2_affine"] > 0.2


DEEPSPEED_BF16_BATCHNORM = """
import torch
from linrep.bench.gpu_check import image_config, init_single_process_group
from trainer.engine import DeepSpeedEngine
from trainer.loop import train_step
from trainer.models import InputSpec, build_classifier
init_single_process_group(torch.device("cpu"))
cfg = image_config("resnet10t", "deepspeed", 2, 4, 32, False)
engine = DeepSpeedEngine(build_classifier(cfg, InputSpec(channels=3, size=32), 10), cfg.optim, torch.device("cpu"),
                         micro_batch=4, bf16=True)
x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
losses = [float(train_step(engine, x, y, 0.0)[0]) for _ in range(2)]
assert all(l == l for l in losses), losses
print(sorted(str(b.dtype) for b in engine.module.buffers() if b.is_floating_point())[0])
"""


def test_deepspeed_bf16_trains_a_batchnorm_network(tmp_path):
    """DeepSpeed 0.19 keeps buffers fp32 unless told: BatchNorm then fails in bf16 (seen on an H100)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", DEEPSPEED_BF16_BATCHNORM], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "torch.bfloat16"


# ---- ckpt-storage: S3 (a moto server the bench starts) against a local folder -----------------------
def test_quick_ckpt_storage_trains_twice_and_reports_the_s3_over_local_ratio(tmp_path):
    """Real Ray Train runs, a real moto server on 127.0.0.1 (started and stopped by the bench), no bed."""
    import socket

    out = run_bench(["ckpt-storage", "--quick", "--no-mlflow", "--out", str(tmp_path / "res")], cwd=tmp_path,
                    timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.match(r"^ckpt-storage: ratio [0-9.e+-]+ \(target <= 1\.5\)$", last), last
    data = json.loads((tmp_path / "res" / "ckpt-storage.json").read_text())
    f = data["figures"]
    assert data["quick"] and not data["details"].get("error")
    assert math.isclose(data["ratio"], f["s3_wall_s"] / f["local_wall_s"], rel_tol=1e-9)
    # both runs wrote real checkpoints of the same model: the same bytes, in the bucket and on disk
    assert f["checkpoint_bytes_s3"] > 10_000 and f["checkpoints_kept_s3"] >= 1
    assert f["checkpoint_bytes_s3"] == pytest.approx(f["checkpoint_bytes_local"], rel=0.01)
    assert list((tmp_path / "res" / "cache" / "ckpt_storage_local").glob("bench-ckpt-local-*/checkpoint_*/meta.json"))
    # the moto server was on loopback and is gone again
    endpoint = data["details"]["endpoint"]
    assert endpoint.startswith("http://127.0.0.1:")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))) != 0
