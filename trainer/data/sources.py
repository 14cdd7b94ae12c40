"""Training data sources, one per dataset family, behind `create_train_data`.

A source tells the model what it sees (`spec`), how many head rows it needs (`num_outputs`) and
yields (inputs, targets) batches for this worker from a given step on, deterministically in
(seed, rank, step) so a resumed run sees the data it would have seen.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from trainer.config import Config
from trainer.models import InputSpec


class TrainData(Protocol):
    spec: InputSpec
    num_outputs: int

    def batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def stats(self) -> dict[str, float]: ...


class SyntheticTrainData:
    """Fresh DGP samples every step, drawn on the training device."""

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device):
        from trainer.data.synthetic import SyntheticDGP

        self.dgp = SyntheticDGP(cfg.data, cfg.data_seed, device)
        self.spec = InputSpec(dim=cfg.data.dim)
        self.num_outputs = self.dgp.num_outputs
        self.per_worker = cfg.optim.batch_size // world_size
        self.seed, self.rank, self.device = cfg.run.seed, rank, device

    def batches(self, start_step: int):
        from trainer.data.synthetic import make_generator

        step = start_step
        while True:
            gen = make_generator([self.seed, self.rank, step], self.device)
            b = self.dgp.sample(self.per_worker, gen)
            yield b.x, b.target
            step += 1

    def stats(self) -> dict[str, float]:
        return {}


def create_train_data(cfg: Config, rank: int, world_size: int, device: torch.device) -> TrainData:
    if cfg.is_synthetic:
        return SyntheticTrainData(cfg, rank, world_size, device)
    from trainer.data.images import ImageTrainData

    return ImageTrainData(cfg, rank, world_size, device)
