"""Image training data: WebDataset shards streamed per Ray Train worker, labelled by a label scheme.

The pipeline is built inside the worker (stream.make_train_loader): this rank's shards, shuffled
with a buffer seeded by seed+epoch, exactly `batches_per_epoch` batches per rank so every rank
steps equally often. ImageNet gets timm's train transform (as a uint8 crop on the JPEG bytes when
there is no RandAugment or random erasing: `stream.JpegRandomResizedCrop`) and optional mixup.
"""

from __future__ import annotations

import torch

from trainer.config import Config
from trainer.data.integrity import verified
from trainer.data.imagenet import imagenet_fast_train_transform, imagenet_train_transform
from trainer.data.labels import create_label_scheme
from trainer.data.shards import load_manifest
from trainer.data.stream import SkipCounter, epoch_batches, make_train_loader
from trainer.models import InputSpec


class ImageTrainData:
    """(images [B, C, H, W], targets [B] or soft targets [B, K]) for this worker, epoch after epoch."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        # corrupt shards stop the run here (or are dropped and counted with data.on_error=skip)
        self.manifest, skipped_at_start = verified(load_manifest(cfg.data.root), "train", cfg.data.on_error)
        self.labels = create_label_scheme(cfg.data, self.manifest, cfg.data_seed)
        self.num_outputs = self.labels.num_classes
        self.spec = InputSpec(channels=self.manifest.channels, size=cfg.data.image_size)
        self.micro_batch = cfg.optim.batch_size // world_size // cfg.optim.grad_accum
        self.batches_per_epoch = epoch_batches(self.manifest, "train", self.micro_batch, world_size,
                                               cfg.data.max_samples)
        self.transform = self._imagenet_transform() if cfg.data.dataset == "imagenet" else None
        self.mixup = self._make_mixup()
        self.skipped = SkipCounter()  # finished epochs; the running loader counts its own
        self.skipped.add(skipped_at_start)
        self._loader = None
        self.epoch = 0

    def _imagenet_transform(self):
        """The uint8 crop + flip + colour jitter when the recipe has no RandAugment or random erasing
        (JPEG bytes -> uint8, normalised in this process; ~2x fewer loader CPU seconds per image,
        `linrep bench imagenet-input`), else timm's PIL transform."""
        model = self.cfg.model
        fast = imagenet_fast_train_transform(self.cfg.data, model.encoder, model.pretrained)
        return fast if fast is not None else imagenet_train_transform(self.cfg.data, model.encoder, model.pretrained)

    def _make_mixup(self):
        """timm's Mixup/CutMix (soft targets, label smoothing folded in), or None when both are off."""
        optim = self.cfg.optim
        if optim.mixup <= 0 and optim.cutmix <= 0:
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=optim.mixup, cutmix_alpha=optim.cutmix, label_smoothing=optim.label_smoothing,
                     num_classes=self.num_outputs)

    def batches(self, start_step: int):
        """Micro-batches from `start_step` on. A resumed run starts a fresh shuffle of the epoch it
        stopped in (seeded by the offset), so no rank reads past the epoch's end."""
        self.epoch, offset = divmod(start_step, self.batches_per_epoch)
        while True:
            loader = make_train_loader(self.cfg.data, self.manifest, rank=self.rank, world_size=self.world_size,
                                       batch_size=self.micro_batch, seed=self.cfg.run.seed + 7919 * offset,
                                       epoch=self.epoch, num_batches=self.batches_per_epoch - offset,
                                       transform=self.transform, device=self.device)
            self._loader = loader
            for batch in loader:
                x = batch["image"].to(self.device, non_blocking=True)
                y = self.labels(batch).to(self.device)
                if self.mixup is not None:
                    x, y = self.mixup(x, y)
                yield x, y
            self.skipped.add(loader.skipped.count, loader.skipped.reasons)
            self._loader = None
            self.epoch += 1
            offset = 0

    def stats(self) -> dict[str, float]:
        running = self._loader.skipped.count if self._loader is not None else 0
        return {"data/epoch": float(self.epoch), "data/skipped": float(self.skipped.count + running)}
