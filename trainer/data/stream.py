"""WebDataset loaders, built inside each Ray Train worker.

Training (``make_train_loader``): every rank reads only its own shards (shards split by rank,
then by data-loader worker; when there are fewer shards than parts, every part reads all of them
but keeps a disjoint stride of samples). Each worker cycles through its shards forever in a
seeded order (a fresh permutation per pass), shuffles samples in a buffer, decodes, batches
inside the pipeline, and stops after its share of ``num_batches`` (``DataPipeline.with_epoch``):
every rank yields EXACTLY ``num_batches`` batches, which DDP/ZeRO need (unequal counts hang).

Evaluation (``make_eval_loader``): one process, the split's shards in manifest order.

Corrupt data: ``on_error="raise"`` raises a one-line ``RuntimeFault`` naming the shard and the
sample key; ``"skip"`` drops the sample (or the rest of a truncated shard) and counts it in the
loader's ``skipped`` (a ``SkipCounter``).

Batches: ``{"image": float32 [B,C,H,W] in [0,1], "factors": float32 [B,F], "cls": int64 [B],
"key": list[str], "index": int64 [B]}`` (index = int(key) when numeric, else -1). With a
``JpegRandomResizedCrop`` transform (ImageNet training without RandAugment / random erasing) the
images cross from the loader processes as uint8 and are normalised by its mean/std in the
training process, once.
"""

from __future__ import annotations

import io
import math
import random
import tarfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_png
from torchvision.transforms import ColorJitter, InterpolationMode
from torchvision.transforms.v2.functional import resized_crop

from trainer.config import DataConfig
from trainer.data.npy import NpyReader
from trainer.data.shards import Manifest, open_shard, shard_urls
from trainer.data.tario import group_samples, tar_members
from trainer.storage import Location, locate
from trainer.errors import RuntimeFault, UserError

Transform = Callable[[Image.Image], Any]
ON_ERROR = ("raise", "skip")


# ---- which samples a reader sees -----------------------------------------------------------------
@dataclass(frozen=True)
class ShardSlice:
    """Part of one shard: its first ``limit`` samples, then every ``stride``-th from ``offset``."""

    url: str
    limit: int | None = None
    stride: int = 1
    offset: int = 0
    shard_samples: int | None = None  # samples in the whole shard (from the manifest), if known

    def keeps(self, position: int) -> bool:
        return position % self.stride == self.offset

    @property
    def num_samples(self) -> int | None:
        """Samples this slice yields, when the shard's size is known."""
        if self.shard_samples is None:
            return None
        n = self.shard_samples if self.limit is None else min(self.limit, self.shard_samples)
        return max(0, -(-(n - self.offset) // self.stride))


def split_slices(slices: list[ShardSlice], part: int, parts: int) -> list[ShardSlice]:
    """Disjoint share ``part`` of ``parts``: whole shards when there are enough, else strides."""
    if parts <= 1:
        return list(slices)
    if len(slices) >= parts:
        return slices[part::parts]
    return [replace(s, stride=s.stride * parts, offset=s.offset + s.stride * part) for s in slices]


def training_slices(manifest: Manifest, root: Path, max_samples: int | None = None,
                    split: str = "train") -> list[ShardSlice]:
    """The split's shards, cut to the first ``max_samples`` samples (whole shards, then a limit)."""
    slices = []
    remaining = max_samples
    for url, info in zip(shard_urls(root, manifest, split), manifest.shards(split)):
        if remaining is not None and remaining <= 0:
            break
        limit = None if remaining is None or remaining >= info.num_samples else remaining
        slices.append(ShardSlice(url, limit, shard_samples=info.num_samples))
        if remaining is not None:
            remaining -= info.num_samples
    return slices


def epoch_batches(manifest: Manifest, split: str, batch_size: int, world_size: int,
                  max_samples: int | None = None) -> int:
    """Batches per rank in one pass over the split (``batch_size`` per rank; at least 1)."""
    n = manifest.split_samples(split)
    if max_samples is not None:
        n = min(n, max_samples)
    return max(1, n // (batch_size * world_size))


# ---- skipping ---------------------------------------------------------------------------------------
@dataclass
class SkipCounter:
    """Samples skipped as corrupt so far (``on_error="skip"``), with the first few reasons."""

    count: int = 0
    reasons: list[str] = field(default_factory=list)
    keep: int = 20

    def add(self, count: int, reasons: Iterable[str] = ()) -> None:
        self.count += count
        for r in reasons:
            if len(self.reasons) < self.keep:
                self.reasons.append(r)


class _Fault:
    """Per-reader error policy: raise a one-line RuntimeFault, or count and go on."""

    def __init__(self, on_error: str):
        if on_error not in ON_ERROR:
            raise UserError(f"on_error={on_error!r}: expected raise or skip")
        self.skip = on_error == "skip"
        self.pending = SkipCounter()

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise RuntimeFault(message)
        self.pending.add(1, [message])

    def take(self) -> tuple[int, list[str]]:
        count, reasons = self.pending.count, self.pending.reasons
        self.pending = SkipCounter()
        return count, reasons


# ---- reading and decoding ---------------------------------------------------------------------------
def read_slice(sl: ShardSlice, fault: _Fault) -> Iterator[dict]:
    """Raw samples (bytes per field, plus __key__/__url__) of one shard slice, in shard order."""
    where = {"key": "<start>"}  # key of the last file read whole: the corruption follows it
    try:
        with open_shard(sl.url) as fh:  # a local file or a stream from s3://..., read whole once
            for position, sample in enumerate(group_samples(tar_members(fh), sl.url, where)):
                if sl.limit is not None and position >= sl.limit:
                    return
                if sl.keeps(position):
                    yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        fault(f"shard {sl.url}: corrupt tar after sample {where['key']} ({err.__class__.__name__}: "
              f"{str(err).splitlines()[0] if str(err) else 'no detail'})")


def _cycle(slices: list[ShardSlice], rng: random.Random, fault: _Fault) -> Iterator[dict]:
    """Raw samples of the slices forever: a fresh seeded permutation of the slices per pass."""
    while True:
        order = list(slices)
        rng.shuffle(order)
        produced = False
        for sl in order:
            for sample in read_slice(sl, fault):
                produced = True
                yield sample
        if not produced:
            raise RuntimeFault(f"no readable samples in {len(slices)} shard(s), e.g. {slices[0].url}")


def _to_chw(out: Any) -> torch.Tensor:
    """A transform's output (tensor CHW, or ndarray HW/HWC) -> float32 CHW tensor."""
    if isinstance(out, torch.Tensor):
        return out.float()
    arr = np.asarray(out)
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    arr = arr.astype(np.float32) / scale
    return torch.from_numpy(arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1)))


class SampleDecoder:
    """Raw shard sample -> {image, factors, cls, key, index}; problems go to the fault policy.

    Images come out as uint8 CHW tensors (scaled to float once per batch, in `collate`) or, with
    a transform, as whatever float CHW tensor it makes. PNGs already in the wanted mode and size
    (every DisLib shard) are decoded by libpng through torchvision, ~2x faster than PIL and
    pixel-identical to PIL's `convert("L"/"RGB")` for those modes; anything else goes through PIL.
    """

    def __init__(self, manifest: Manifest, image_size: int, transform: Transform | None = None):
        self.field = manifest.image_format
        self.mode = "L" if manifest.channels == 1 else "RGB"
        self.size = image_size
        self.transform = transform
        self.num_factors = len(manifest.factors)
        self._npy = NpyReader()

    def image(self, data: bytes) -> torch.Tensor:
        if isinstance(self.transform, JpegRandomResizedCrop):
            return self.transform(data)  # uint8 [3, size, size], straight from the bytes
        if self.transform is None and self.field == "png" and _png_fits(data, self.mode, self.size):
            return decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # PIL decodes lazily: force errors to surface here
            img = img.convert(self.mode)
        if self.transform is not None:
            return _to_chw(self.transform(img))
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        arr = np.array(img)  # a writable copy: PIL's buffer is read-only
        return torch.from_numpy(np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)))

    def factors(self, data: bytes) -> torch.Tensor:
        """factors.npy -> float32 [F]; the header (same for every sample of a dataset) is parsed once."""
        arr = self._npy.read(data)  # ValueError for anything but a numeric .npy: a bad sample
        if arr.size != self.num_factors:  # a batch of unequal vectors would not stack
            raise ValueError(f"factors.npy holds {arr.size} values, manifest.json lists {self.num_factors} factors")
        return torch.from_numpy(np.asarray(arr, dtype=np.float32).reshape(-1).copy())

    def __call__(self, sample: dict) -> dict:
        key = sample["__key__"]
        return {"image": self.image(sample[self.field]), "factors": self.factors(sample["factors.npy"]),
                "cls": int(sample["cls"]), "key": key, "index": int(key) if key.isdigit() else -1}


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (PIL mode, PNG colour type) -> bit depths libpng expands exactly like PIL's convert(mode)
_PNG_SAME_MODE = {("L", 0): (1, 8), ("RGB", 2): (8,)}


def _png_fits(data: bytes, mode: str, size: int) -> bool:
    """Whether a PNG's IHDR says `size` x `size`, no interlace, and a colour type already in `mode`."""
    if len(data) < 29 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return False
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, interlace = data[24], data[25], data[28]
    return width == height == size and interlace == 0 and depth in _PNG_SAME_MODE.get((mode, colour), ())


# ---- ImageNet training crops on uint8 -----------------------------------------------------------------
CropBox = tuple[int, int, int, int]  # (top, left, height, width) in the full image's pixels


def random_resized_crop_box(width: int, height: int, rng: Any, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> CropBox:
    """timm's RandomResizedCropAndInterpolation.get_params (torchvision's sampling, Python's `random`):
    10 tries at an area in `scale` and a log-uniform aspect ratio, then a centre crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_scale(box: CropBox, size: int) -> int:
    """The JPEG DCT scaling (1, 2, 4 or 8) that still leaves the crop at least `size` pixels a side:
    decoding at 1/s costs ~1/s² of the IDCT and colour conversion (1 when the crop is under 2x size)."""
    fits = min(box[2], box[3]) // size
    return next((s for s in (8, 4, 2) if fits >= s), 1)


class JpegRandomResizedCrop:
    """JPEG bytes -> uint8 [3, size, size]: timm's training crop without its float tensors.

    The crop box is sampled from the header's size before anything is decoded
    (`random_resized_crop_box`). Most crops of an ImageNet-sized image (~400x350) are under twice
    `size`: libjpeg-turbo through torchvision decodes the whole image (pixel-identical to PIL's
    decode, ~20 % faster) and torch's antialiased uint8 resize crops and scales it (within 2 levels
    of PIL's, mean difference ~0.004 levels; ~0.33 ms against PIL's 0.71 ms at 250x280 -> 224).
    A crop at least twice `size` a side is decoded at 1/2, 1/4 or 1/8 scale (PIL's `draft`: DCT
    scaling, ~1/s² of the IDCT and colour conversion) and resized by PIL from the box mapped onto
    the smaller image. Then the horizontal flip and, if set, torchvision's ColorJitter (what timm
    adds when RandAugment is off). No ToTensor/Normalize here: uint8 crosses to the training
    process (a quarter of float32's bytes) and `_float_images` normalises with `mean`/`std` there.
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], *,
                 interpolation: str = "bicubic", scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5, color_jitter: float = 0.0,
                 use_draft: bool = True, rng: random.Random | None = None):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.interpolation = interpolation
        self.scale, self.ratio, self.flip, self.use_draft = scale, ratio, flip, use_draft
        self.jitter = ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        # None = Python's global generator, as timm's crop uses (DataLoader seeds it per worker);
        # a module cannot be pickled, so it is looked up per call (spawned loader workers pickle this)
        self.rng = rng
        self.drafted = 0   # crops decoded at reduced scale by this process (for tests and benchmarks)

    def __call__(self, data: bytes) -> torch.Tensor:
        rng = self.rng if self.rng is not None else random
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            box = random_resized_crop_box(img.width, img.height, rng, self.scale, self.ratio)
            out = self.crop(data, img, box)  # [3, size, size] uint8
        if rng.random() < self.flip:
            out = out.flip(-1)
        return self.jitter(out) if self.jitter is not None else out

    def crop(self, data: bytes, img: Image.Image, box: CropBox) -> torch.Tensor:
        """The crop `box` (full-size pixels) of the image `data` (header already read into `img`),
        resized to uint8 [3, size, size]."""
        scale = draft_scale(box, self.size) if self.use_draft and img.format == "JPEG" else 1
        if scale > 1:
            self.drafted += 1
            return self._drafted_crop(img, box, scale)
        full = _decode_rgb(data)
        top, left, h, w = box
        return resized_crop(full, top, left, h, w, [self.size, self.size],  # [3, H, W] -> [3, size, size]
                            interpolation=_TORCH_INTERPOLATION[self.interpolation], antialias=True)

    def _drafted_crop(self, img: Image.Image, box: CropBox, scale: int) -> torch.Tensor:
        top, left, h, w = box
        full_w = img.width
        drafted = img.draft("RGB", (img.width // scale, img.height // scale))
        img.load()  # a corrupt JPEG raises here, inside the decode stage's fault policy
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        # Pixel k of the 1/s image covers pixels [k*s, (k+1)*s) of the full one: the box scales by
        # 1/s (draft's box is (0, 0, W/s, H/s)) and is fractional, which resize(box=) takes as is.
        f = drafted[1][2] / full_w if drafted else 1.0
        out = rgb.resize((self.size, self.size), _PIL_RESAMPLE[self.interpolation],
                         box=(left * f, top * f, (left + w) * f, (top + h) * f))
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)  # HWC -> [3, size, size] view


def _decode_rgb(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] by torchvision's decoders; their errors name a C++ source line first
    ("decode_jpeg, /path/decode_jpeg.cpp:171, Image is incomplete or truncated"): keep the reason."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise ValueError(str(err).rsplit(", ", 1)[-1].strip() or "undecodable image") from None


_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                 "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
                 "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}


def fast_interpolations() -> tuple[str, ...]:
    """Interpolations `JpegRandomResizedCrop` resizes with (timm's data-config names)."""
    return tuple(_TORCH_INTERPOLATION)


_TORCH_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                        "nearest": InterpolationMode.NEAREST}


def _decode_stage(samples: Iterator[dict], decoder: SampleDecoder, fault: _Fault,
                  give_up: int | None = None) -> Iterator[dict]:
    """Decoded samples; an undecodable one goes to the fault policy. `give_up` undecodable samples
    in a row (more than the reader's shards hold) stop even a skipping reader, which would
    otherwise cycle through them forever."""
    in_a_row, message = 0, ""
    for sample in samples:
        try:
            decoded = decoder(sample)
        except Exception as err:  # any undecodable field of any sample: PIL, numpy, KeyError, ...
            message = (f"shard {sample.get('__url__')}: sample {sample.get('__key__')}: undecodable "
                       f"({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})")
            in_a_row += 1
            if give_up is None or in_a_row < give_up:
                fault(message)
                continue
            break
        in_a_row = 0
        yield decoded
    if give_up is not None and in_a_row >= give_up:
        raise RuntimeFault(f"no decodable sample in {in_a_row} in a row, more than the shards hold "
                           f"(data.on_error=skip cannot train on them), e.g. {message}")


def collate(samples: list[dict]) -> dict:
    """Samples -> a batch; images stay uint8 here (scaled by `_float_images` where the batch is used)."""
    return {"image": torch.stack([s["image"] for s in samples]),  # [B,C,H,W]
            "factors": torch.stack([s["factors"] for s in samples]),
            "cls": torch.tensor([s["cls"] for s in samples], dtype=torch.int64),
            "key": [s["key"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64)}


def _with_skips(fault: _Fault) -> Callable[[list[dict]], dict]:
    """Collate and attach the skips since the previous batch (they cross the worker boundary)."""
    def collate_counting(samples: list[dict]) -> dict:
        batch = collate(samples)
        batch["skipped"], batch["skip_reasons"] = fault.take()
        return batch
    return collate_counting


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# ---- training ----------------------------------------------------------------------------------------
class _TrainStream(torch.utils.data.IterableDataset):
    """One rank's stream; each DataLoader worker builds its own WebDataset pipeline."""

    def __init__(self, slices: list[ShardSlice], decoder: SampleDecoder, *, batch_size: int, shuffle_buffer: int,
                 seed: int, epoch: int, rank: int, num_batches: int, on_error: str):
        super().__init__()
        self.slices, self.decoder, self.batch_size = slices, decoder, batch_size
        self.shuffle_buffer, self.seed, self.epoch, self.rank = shuffle_buffer, seed, epoch, rank
        self.num_batches, self.on_error = num_batches, on_error

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        quota = self.num_batches // workers + (worker < self.num_batches % workers)
        if quota == 0:
            return iter(())
        fault = _Fault(self.on_error)
        seed = _seed(self.seed, self.epoch, self.rank, worker)
        mine = split_slices(self.slices, worker, workers)
        stages: list[Any] = [lambda: _cycle(mine, random.Random(seed), fault)]
        buffer = _buffer_size(self.shuffle_buffer, mine)
        if buffer > 1:
            # Shuffle raw bytes (cheap to hold), before decoding.
            stages.append(wds.shuffle(buffer, initial=buffer, rng=random.Random(seed + 1)))
        known = [sl.num_samples for sl in mine]
        give_up = None if None in known else 2 * sum(known) + buffer + 1  # two passes and a buffer
        stages += [lambda src: _decode_stage(src, self.decoder, fault, give_up),
                   wds.batched(self.batch_size, collation_fn=_with_skips(fault), partial=False)]
        return iter(wds.DataPipeline(*stages).with_epoch(nbatches=quota))


def _buffer_size(requested: int, slices: list[ShardSlice]) -> int:
    """No bigger than one pass over the slices: a larger buffer would hold repeats of a sample."""
    counts = [s.num_samples for s in slices]
    return requested if None in counts else min(requested, sum(counts))


class TrainLoader:
    """Exactly ``num_batches`` batches per iteration; ``skipped`` counts corrupt samples."""

    def __init__(self, dataset: _TrainStream, workers: int, num_batches: int, device: torch.device | None = None):
        self.dataset, self.workers, self.num_batches, self.device = dataset, workers, num_batches, device
        self.skipped = SkipCounter()
        self.normalize = _normalization(dataset.decoder.transform, device)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                             persistent_workers=False)
        batches = iter(loader)
        try:
            yield from _count_skips(batches, self.skipped, self.normalize, self.device)
        finally:
            # Stop worker processes now, not when a traceback holding this frame is collected.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


Normalization = tuple[torch.Tensor, torch.Tensor]  # (scale, shift), each [1, C, 1, 1]


def _normalization(transform: Transform | None, device: torch.device | None = None) -> Normalization | None:
    """A uint8 transform's mean/std as one multiply-add on 0..255 values; None for other transforms."""
    if not isinstance(transform, JpegRandomResizedCrop):
        return None
    mean = torch.tensor(transform.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(transform.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std), -mean / std  # (x / 255 - mean) / std = x * scale + shift


def _float_images(batch: dict, normalize: Normalization | None = None, device: torch.device | None = None) -> dict:
    """uint8 images -> float32 in [0, 1] (or normalised by `normalize`), in the process that trains,
    on `device` when given (a GPU gets uint8, a quarter of float32's bytes, and converts there).

    Loader processes send uint8 (a quarter of the bytes through shared memory) and the scaling
    happens here: measured on the full dSprites set, the training process spent ~8 % of its step
    touching freshly mapped shared-memory pages when float32 batches crossed over. Only uint8
    batches are touched, so a batch is never scaled twice.
    """
    images = batch["image"]
    if images.dtype != torch.uint8:
        return batch
    images = images.to(device).float() if device is not None else images.float()  # [B, C, H, W]
    if normalize is None:
        batch["image"] = images.div_(255.0)
    else:  # one fused pass: x * scale + shift
        scale, shift = normalize
        batch["image"] = torch.addcmul(shift, images, scale, out=images)
    return batch


def _count_skips(batches: Iterable[dict], counter: SkipCounter, normalize: Normalization | None = None,
                 device: torch.device | None = None) -> Iterator[dict]:
    message = None
    try:
        for batch in batches:
            counter.add(batch.pop("skipped"), batch.pop("skip_reasons"))
            yield _float_images(batch, normalize, device)
    except RuntimeFault as err:
        # DataLoader re-raises worker errors with the worker's traceback in the message: keep the line.
        message = _last_line(str(err))
    if message is not None:
        raise RuntimeFault(message)  # outside `except`: no chained traceback to print or keep alive


def _last_line(message: str) -> str:
    marker = "RuntimeFault: "
    lines = [ln for ln in message.splitlines() if ln.strip()]
    for line in reversed(lines):
        if marker in line:
            return line.split(marker, 1)[1]
    return lines[-1] if lines else message


def _root(data: DataConfig, manifest: Manifest) -> Path | Location:
    root = manifest.root or (locate(data.root) if data.root else None)
    if root is None:
        raise UserError("data.root is not set and the manifest was not loaded from a folder")
    return root


def make_train_loader(data: DataConfig, manifest: Manifest, *, rank: int, world_size: int, batch_size: int,
                      seed: int, epoch: int, num_batches: int, on_error: str | None = None,
                      transform: Transform | None = None, split: str = "train",
                      device: torch.device | None = None) -> TrainLoader:
    """This rank's training batches for one epoch: exactly ``num_batches`` of ``batch_size``.

    Reads only this rank's shards (``rank``/``world_size``), split again over
    ``data.loader_workers`` processes; shuffled in a ``data.shuffle_buffer`` seeded by
    seed, epoch and rank; ``data.max_samples`` keeps only the first samples of the split.
    ``on_error`` ("raise" | "skip") defaults to ``data.on_error``; ``transform`` replaces the
    resize to ``data.image_size`` (it gets the decoded PIL image, returns a CHW tensor or HW(C) array;
    a ``JpegRandomResizedCrop`` gets the raw bytes instead, and its uint8 output is normalised here).
    ``device``: where uint8 images become float (None: on the CPU, in the training process).
    """
    if not 0 <= rank < world_size:
        raise UserError(f"rank={rank} is outside world_size={world_size}")
    if (on_error or data.on_error) not in ON_ERROR:
        raise UserError(f"on_error={on_error!r}: expected raise or skip")
    slices = training_slices(manifest, _root(data, manifest), data.max_samples, split)
    if not slices:
        raise UserError(f"{manifest.dataset}: split '{split}' has no shards")
    mine = split_slices(slices, rank, world_size)
    decoder = SampleDecoder(manifest, data.image_size, transform)
    stream = _TrainStream(mine, decoder, batch_size=batch_size, shuffle_buffer=data.shuffle_buffer, seed=seed,
                          epoch=epoch, rank=rank, num_batches=num_batches, on_error=on_error or data.on_error)
    return TrainLoader(stream, data.loader_workers, num_batches, device)


# ---- evaluation ----------------------------------------------------------------------------------------
class EvalLoader:
    """All samples of a split in shard order (the last batch may be short); re-iterable."""

    def __init__(self, slices: list[ShardSlice], decoder: SampleDecoder, batch_size: int, on_error: str,
                 num_samples: int):
        self.slices, self.decoder, self.batch_size, self.on_error = slices, decoder, batch_size, on_error
        self.num_samples = num_samples
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        fault = _Fault(self.on_error)
        pipeline = wds.DataPipeline(
            lambda: (s for sl in self.slices for s in read_slice(sl, fault)),
            lambda src: _decode_stage(src, self.decoder, fault),
            wds.batched(self.batch_size, collation_fn=_with_skips(fault), partial=True))
        yield from _count_skips(pipeline, self.skipped, _normalization(self.decoder.transform))


def make_eval_loader(data: DataConfig, manifest: Manifest, split: str, *, batch_size: int,
                     max_samples: int | None = None, transform: Transform | None = None) -> EvalLoader:
    """A split's samples in order, in one process (probes, validation)."""
    slices = training_slices(manifest, _root(data, manifest), max_samples, split)
    n = manifest.split_samples(split) if max_samples is None else min(max_samples, manifest.split_samples(split))
    decoder = SampleDecoder(manifest, data.image_size, transform)
    return EvalLoader(slices, decoder, batch_size, data.on_error, n)
