"""ImageNet arm on CPU: a tiny timm model trained through Ray Train + DeepSpeed (2 workers, ZeRO-2)
on fabricated shards — JPEGs named like real ImageNet-X validation images, coloured by a learnable
rule — checkpoints, resumes, and its checkpoints are probed (val accuracy + ImageNet-X)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_linrep
from trainer.checkpoint import list_checkpoints, read_meta

CLASSES = (1, 260, 510, 760)  # standard class indices: two below 500, two above (binary granularity)
COLOURS = ((220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40))


def coloured_jpeg(rng: np.random.Generator, colour) -> bytes:
    img = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def imagenet_shards(tmp_path_factory) -> Path:
    from tests.fabricate_imagenet import real_val_names
    from trainer.data.convert.imagenet import convert_imagenet
    from trainer.data.imagenet import standard_classes

    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("imagenet_src")
    wnids, _ = standard_classes()
    names = list(real_val_names(num_classes=8, per_class=15))  # real ImageNet-X validation file names
    for k, cls in enumerate(CLASSES):
        train = src / "train" / wnids[cls]
        train.mkdir(parents=True)
        for j in range(80):
            (train / f"{wnids[cls]}_{j}.JPEG").write_bytes(coloured_jpeg(rng, COLOURS[k]))
        val = src / "val" / wnids[cls]
        val.mkdir(parents=True)
        for name in names[k::len(CLASSES)]:
            (val / f"{name}.JPEG").write_bytes(coloured_jpeg(rng, COLOURS[k]))
    out = tmp_path_factory.mktemp("imagenet_shards")
    convert_imagenet(src, out, samples_per_shard=40, processes=1, progress=False)
    return out


def test_tiny_timm_model_deepspeed_two_workers_checkpoints_resumes_is_probed(tmp_path, imagenet_shards, shared_ray):
    common = ["imagenet-resnet50", f"data.root={imagenet_shards}", "model.encoder=resnet10t", "run.use_gpu=false",
              "run.workers=2", "run.cpus_per_worker=1", "optim.batch_size=32", "optim.lr=0.05",
              "optim.warmup_steps=5", "optim.zero_stage=2", "data.image_size=32", "data.loader_workers=0",
              "data.shuffle_buffer=100", "run.checkpoint_every=60", "run.log_every=20", "probe.actor_gpus=0",
              "data.granularity=binary", "run.name=inet"]
    first = run_linrep(["train", *common, "optim.steps=60"], cwd=tmp_path, env=shared_ray, timeout=1200)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    second = run_linrep(["train", *common, "optim.steps=180"], cwd=tmp_path, env=shared_ray, timeout=1200)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert "resumed from step 60" in log
    ckpts = list_checkpoints(tmp_path / "ray_results" / "inet")
    assert read_meta(ckpts[-1])["step"] == 180 and (ckpts[-1] / "ds").is_dir()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("imagenet").experiment_id])[0]
    m = run.data.metrics
    assert m["val/acc"] >= 0.75                     # binary task, chance 0.5: clearly above it
    assert m["probe/imagenetx/found_images"] >= 40  # the val images joined ImageNet-X by file name
    assert any(k.startswith("probe/imagenetx/") and k.endswith("_auc") for k in m)
    steps = sorted(x.step for x in client.get_metric_history(run.info.run_id, "val/acc"))
    assert steps == [60, 120, 180]
