"""The uint8 ImageNet crop of the shard pipeline and `linrep bench imagenet-input`.

The crop against an independent reference (timm's/torchvision's PIL crop), the crop sampling
against timm's, DCT-scaled decoding only where the crop allows, normalisation once in the training
process, a corrupt JPEG under data.on_error, and the benchmark through the CLI (--quick).
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linrep.bench.imagenet_input import encode, fabricate_tree, natural_pixels
from tests.fabricate import damage_one_image
from trainer.config import DataConfig
from trainer.data.convert.imagenet import convert_imagenet
from trainer.data.imagenet import imagenet_data_config, imagenet_fast_train_transform
from trainer.data.shards import load_manifest
from trainer.data.stream import (JpegRandomResizedCrop, _float_images, _normalization, draft_scale,
                                 make_train_loader, random_resized_crop_box, read_slice, training_slices)
from trainer.errors import RuntimeFault

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    return encode(natural_pixels(np.random.default_rng(seed), width, height), 90)


def smooth_jpeg(width: int, height: int) -> bytes:
    """A JPEG of smooth colour fields only (bicubic upsampling of a coarse random grid)."""
    coarse = np.random.default_rng(1).uniform(0, 255, size=(12, 14, 3)).astype(np.uint8)
    return encode(np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)), 90)


def reference_crop(data: bytes, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """What timm's RandomResizedCropAndInterpolation makes of a box: PIL decode, crop, bicubic resize."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    with Image.open(io.BytesIO(data)) as img:
        out = F.resized_crop(img.convert("RGB"), *box, [size, size], InterpolationMode.BICUBIC)
    return np.asarray(out).astype(np.int16)  # [size, size, 3]


def as_hwc(chw: torch.Tensor) -> np.ndarray:
    return chw.permute(1, 2, 0).numpy().astype(np.int16)


# ---- the crop ------------------------------------------------------------------------------------
def test_a_crop_under_twice_the_size_matches_timms_pil_crop():
    """Full decode (libjpeg-turbo via torchvision: the same pixels as PIL's) and torch's antialiased
    uint8 bicubic resize: the same kernel as PIL's (a = -0.5, support scaled by the reduction),
    computed in different fixed-point arithmetic, so a few pixels differ by a level or two."""
    data = jpeg(400, 350)
    crop = JpegRandomResizedCrop(224, MEAN, STD)
    for box in [(40, 50, 250, 280), (0, 0, 350, 400), (100, 120, 60, 90)]:  # down, whole, up-scaling
        with Image.open(io.BytesIO(data)) as img:
            ours = as_hwc(crop.crop(data, img, box))
        diff = np.abs(ours - reference_crop(data, box, 224))
        assert diff.max() <= 2 and diff.mean() < 0.05, (box, diff.max(), diff.mean())
    assert crop.drafted == 0


def test_draft_decoding_only_when_the_crop_is_twice_the_size():
    assert [draft_scale((0, 0, h, w), 224) for h, w in [(447, 900), (448, 448), (900, 1000), (1800, 1900),
                                                       (100, 100)]] == [1, 2, 4, 8, 1]
    data = smooth_jpeg(1200, 1050)
    crop = JpegRandomResizedCrop(224, MEAN, STD)
    box = (100, 100, 900, 1000)  # 4x the output a side: decoded at 1/4 scale
    with Image.open(io.BytesIO(data)) as img:
        ours = as_hwc(crop.crop(data, img, box))
    assert crop.drafted == 1
    # The 1/4-scale IDCT low-passes differently from the antialiased resize of the full decode, so
    # fine texture would differ; on a smooth image what is left is the box's mapping onto the
    # smaller image: measured 0.45 levels on average aligned, 5.2 with the box 4 pixels off.
    diff = np.abs(ours - reference_crop(data, box, 224)).mean()
    shifted = np.abs(ours - reference_crop(data, (104, 104, 900, 1000), 224)).mean()
    assert diff < 1.0 and shifted > 4 * diff, (diff, shifted)
    off = JpegRandomResizedCrop(224, MEAN, STD, use_draft=False)
    with Image.open(io.BytesIO(data)) as img:
        off.crop(data, img, box)
    assert off.drafted == 0


def test_crop_boxes_are_sampled_like_timms():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    for width, height in [(400, 350), (1000, 40), (40, 1000)]:  # the last two reach the fallback
        img = Image.new("RGB", (width, height))
        for seed in range(50):
            random.seed(seed)
            expected = RandomResizedCropAndInterpolation.get_params(img, scale, ratio)
            assert random_resized_crop_box(width, height, random.Random(seed), scale, ratio) == tuple(expected)


def test_fast_path_only_without_randaugment_or_erasing():
    plain = DataConfig(dataset="imagenet", labels="imagenet", image_size=32)
    fast = imagenet_fast_train_transform(plain)
    assert isinstance(fast, JpegRandomResizedCrop) and fast.jitter is not None  # timm's jitter 0.4 kept
    config = imagenet_data_config(32)
    assert (fast.mean, fast.std, fast.interpolation) == (config["mean"], config["std"], config["interpolation"])
    assert imagenet_fast_train_transform(plain.model_copy(update={"auto_augment": "rand-m9-mstd0.5"})) is None
    assert imagenet_fast_train_transform(plain.model_copy(update={"random_erasing": 0.25})) is None


def test_a_uint8_batch_is_normalised_once():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    batch = _float_images({"image": images.clone()}, _normalization(JpegRandomResizedCrop(8, MEAN, STD)))
    expected = (images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(batch["image"], expected)
    again = _float_images(dict(batch), _normalization(JpegRandomResizedCrop(8, MEAN, STD)))
    assert again["image"] is batch["image"]  # float images are left alone


# ---- through the shard pipeline ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("imagenet-input")
    fabricate_tree(base / "tree", {"images": 24, "width": 64, "height": 64, "target_bytes": 3000}, classes=3)
    convert_imagenet(base / "tree", base / "shards", samples_per_shard=8, processes=1, classes_from="train",
                     progress=False)
    return base / "shards"


def data_config(root: Path, workers: int = 1) -> DataConfig:
    return DataConfig(dataset="imagenet", labels="imagenet", root=str(root), image_size=32, loader_workers=workers,
                      shuffle_buffer=0)


def whole_image(size: int = 32) -> JpegRandomResizedCrop:
    """A deterministic crop (the whole square image, no flip): the loader's output is predictable."""
    return JpegRandomResizedCrop(size, MEAN, STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0)


def raw_samples(root: Path) -> dict[str, bytes]:
    from trainer.data.stream import _Fault

    manifest = load_manifest(root)
    return {s["__key__"]: s["jpg"] for sl in training_slices(manifest, root)
            for s in read_slice(sl, _Fault("raise"))}


def test_loader_batches_are_the_crop_normalised_in_the_training_process(shards):
    transform = whole_image()
    loader = make_train_loader(data_config(shards), load_manifest(shards), rank=0, world_size=1, batch_size=4,
                               seed=0, epoch=0, num_batches=6, transform=transform)
    raw = raw_samples(shards)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    seen = 0
    for batch in loader:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 32, 32)
        for image, key in zip(batch["image"], batch["key"]):
            expected = (transform(raw[key]).float() / 255 - mean) / std
            torch.testing.assert_close(image, expected)
            seen += 1
    assert seen == 24


def corrupt_one_jpeg(root: Path, shard: str) -> str:
    """Cut one sample's JPEG in half inside a shard; its key."""
    return damage_one_image(root / shard, "jpg", lambda data: data[: len(data) // 2])


def test_a_corrupt_jpeg_follows_on_error(shards, tmp_path):
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    shard = load_manifest(root).shards("train")[0].name
    key = corrupt_one_jpeg(root, shard)
    manifest = load_manifest(root)

    def loader(on_error: str):
        return make_train_loader(data_config(root, workers=0), manifest, rank=0, world_size=1, batch_size=4,
                                 seed=0, epoch=0, num_batches=5, transform=whole_image(), on_error=on_error)

    skipping = loader("skip")
    batches = list(skipping)
    assert len(batches) == 5 and key not in {k for b in batches for k in b["key"]}
    assert skipping.skipped.count >= 1 and key in skipping.skipped.reasons[0]
    with pytest.raises(RuntimeFault, match=f"sample {key}: undecodable") as raised:
        list(loader("raise"))
    assert ".cpp" not in str(raised.value)  # the decoder's reason, not its source line


# ---- the benchmark -----------------------------------------------------------------------------------
def test_bench_quick_through_the_cli(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "linrep", "bench", "imagenet-input", "--quick", "--no-mlflow",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "imagenet-input.json").read_text())
    assert result["ratio"] > 0 and result["op"] == ">=" and result["target"] == 1.2
    assert result["figures"]["shards_samples_per_s"] > 0 and result["figures"]["folder_samples_per_s"] > 0
    assert proc.stdout.strip().splitlines()[-1] == result["ratio_line"]
    assert result["ratio_line"].startswith("imagenet-input: ratio ")
