"""Label schemes: what "number of classes" means on image datasets.

A scheme is built from the data config and the manifest and maps a batch (see
``trainer.data.stream``) to integer targets:

* ``factor`` (alias ``class``): a categorical factor (``data.factor`` or the manifest's default),
  class = position of its value in the factor's grid — the paper's DisLib task;
* ``partition``: K = ``data.num_classes`` seeded Voronoi cells of the normalised factor space
  (min-max per factor from the value grids; periodic factors as cos/sin) — any number of classes;
* ``instance`` (DIET): one class per sample, the numeric ``__key__``.

Register more with ``@register_label_scheme(name)``. Schemes that live elsewhere are imported on
first use from ``LAZY_SCHEMES``: ``imagenet`` is ``ImagenetLabels`` in ``trainer/data/imagenet.py``,
which registers itself when ``create_label_scheme`` first imports that module (it needs torch
and the imagenet-x class files, which the other schemes do not).
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

import numpy as np
import torch

from trainer.config import DataConfig
from trainer.data.shards import Factor, Manifest
from trainer.errors import RuntimeFault, UserError


class LabelScheme:
    """Maps batches to targets in [0, num_classes)."""

    name = "base"
    num_classes: int

    def __init__(self, data: DataConfig, manifest: Manifest, seed: int = 0):
        self.data, self.manifest, self.seed = data, manifest, seed

    def __call__(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError


LABEL_SCHEMES: dict[str, type[LabelScheme]] = {}
# Schemes whose module registers them on import (kept out of here to respect module ownership).
LAZY_SCHEMES: dict[str, str] = {"imagenet": "trainer.data.imagenet"}


def register_label_scheme(name: str, *aliases: str) -> Callable[[type[LabelScheme]], type[LabelScheme]]:
    def register(cls: type[LabelScheme]) -> type[LabelScheme]:
        cls.name = name
        for key in (name, *aliases):
            LABEL_SCHEMES[key] = cls
        return cls
    return register


def create_label_scheme(data: DataConfig, manifest: Manifest, seed: int | None = None) -> LabelScheme:
    """The scheme named by ``data.labels``; ``seed`` (pass ``Config.data_seed``) defaults to
    ``data.seed`` or 0 and only matters for seeded schemes (partition)."""
    name = data.labels
    if name not in LABEL_SCHEMES and name in LAZY_SCHEMES:
        try:
            importlib.import_module(LAZY_SCHEMES[name])
        except ImportError as err:
            raise UserError(f"data.labels={name}: its module {LAZY_SCHEMES[name]} is not available ({err})") from None
    if name not in LABEL_SCHEMES:
        raise UserError(f"data.labels={name}: unknown label scheme (known: {', '.join(sorted(LABEL_SCHEMES))})")
    seed = seed if seed is not None else (data.seed if data.seed is not None else 0)
    return LABEL_SCHEMES[name](data, manifest, seed)


def _grid_lookup(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid value for every value (grid sorted ascending)."""
    pos = torch.searchsorted(grid, values.contiguous()).clamp(1, len(grid) - 1) if len(grid) > 1 else \
        torch.zeros_like(values, dtype=torch.int64)
    if len(grid) == 1:
        return pos
    left, right = grid[pos - 1], grid[pos]
    return torch.where((values - left).abs() <= (right - values).abs(), pos - 1, pos)


@register_label_scheme("factor", "class")
class FactorLabels(LabelScheme):
    """Class = index of a categorical factor's value in its grid (the paper's DisLib task)."""

    def __init__(self, data: DataConfig, manifest: Manifest, seed: int = 0):
        super().__init__(data, manifest, seed)
        name = data.factor or manifest.default_factor
        if name is None:
            raise UserError(f"data.factor is required: dataset {manifest.dataset} has no default factor "
                            f"(factors: {', '.join(manifest.factor_names)})")
        factor = manifest.factor(name)
        if factor["kind"] != "categorical":
            categorical = [f["name"] for f in manifest.factors if f["kind"] == "categorical"]
            raise UserError(f"data.factor={name} is {factor['kind']}, labels=factor needs a categorical factor "
                            f"({', '.join(categorical)}) — or use data.labels=partition")
        self.factor_name, self.column = name, manifest.factor_index(name)
        self.grid = torch.tensor(sorted(factor["values"]), dtype=torch.float64)
        self.num_classes = factor["size"]

    def __call__(self, batch: dict) -> torch.Tensor:
        values = batch["factors"][:, self.column].to(torch.float64)
        return _grid_lookup(values, self.grid.to(values.device))


def _period(factor: Factor) -> float:
    """Period of a periodic factor's grid: evenly spaced values cover one turn.

    A grid whose span is a full turn already (dSprites' orientation: 0..2π with 2π ≡ 0) has
    period = span; otherwise (hues 0..0.9, azimuth 0..34) period = span + one step.
    """
    values = np.sort(np.asarray(factor["values"], dtype=np.float64))
    span = values[-1] - values[0]
    if np.isclose(span, 2 * np.pi, rtol=1e-4) or np.isclose(span, 360.0, rtol=1e-4):
        return float(span)
    step = float(np.median(np.diff(values))) if len(values) > 1 else 1.0
    return float(span + step)


class FactorEmbedding:
    """Factor values -> points in a normalised space: min-max to [0, 1] per factor, periodic
    factors as (cos, sin)/2 (diameter 1, like the others); constant factors are dropped."""

    def __init__(self, factors: list[Factor]):
        self.columns, self.low, self.span, self.periodic = [], [], [], []
        for j, f in enumerate(factors):
            values = np.asarray(f["values"], dtype=np.float64)
            if f["size"] < 2 or np.ptp(values) == 0:
                continue
            self.columns.append(j)
            self.low.append(values.min())
            self.periodic.append(f["kind"] == "periodic")
            self.span.append(_period(f) if f["kind"] == "periodic" else float(np.ptp(values)))
        if not self.columns:
            raise UserError("labels=partition: the dataset has no varying factor to partition")

    @property
    def dim(self) -> int:
        return len(self.columns) + sum(self.periodic)

    def __call__(self, factors: torch.Tensor) -> torch.Tensor:
        x = factors[:, self.columns].to(torch.float64)
        low = torch.tensor(self.low, dtype=torch.float64, device=x.device)
        span = torch.tensor(self.span, dtype=torch.float64, device=x.device)
        unit = (x - low) / span
        parts = []
        for i, periodic in enumerate(self.periodic):
            if periodic:
                angle = 2 * math.pi * unit[:, i]
                parts += [0.5 * torch.cos(angle), 0.5 * torch.sin(angle)]
            else:
                parts.append(unit[:, i])
        return torch.stack(parts, dim=1)


@register_label_scheme("partition")
class PartitionLabels(LabelScheme):
    """K seeded Voronoi cells of the normalised factor space; centres are distinct grid points."""

    def __init__(self, data: DataConfig, manifest: Manifest, seed: int = 0):
        super().__init__(data, manifest, seed)
        self.embed = FactorEmbedding(manifest.factors)
        self.num_classes = data.num_classes
        self.centres = self.embed(torch.from_numpy(self._grid_points(manifest.factors, data.num_classes, seed)))

    @staticmethod
    def _grid_points(factors: list[Factor], k: int, seed: int) -> np.ndarray:
        sizes = [f["size"] for f in factors]
        total = math.prod(sizes)
        if k > total:
            raise UserError(f"data.num_classes={k} exceeds the {total} points of the factor grid")
        flat = np.random.default_rng(seed).choice(total, size=k, replace=False)
        idx = np.unravel_index(flat, sizes)
        return np.stack([np.asarray(f["values"], dtype=np.float64)[i] for f, i in zip(factors, idx)], axis=1)

    def __call__(self, batch: dict) -> torch.Tensor:
        points = self.embed(batch["factors"])
        self.centres = self.centres.to(points.device)
        return torch.cdist(points, self.centres).argmin(dim=1)


@register_label_scheme("instance")
class InstanceLabels(LabelScheme):
    """DIET: one class per sample, the numeric key. Subsets whose keys are not 0..N-1 list
    their keys in ``manifest.extra["keys"]``; labels are then positions in that list."""

    def __init__(self, data: DataConfig, manifest: Manifest, seed: int = 0):
        super().__init__(data, manifest, seed)
        keys = manifest.extra.get("keys")
        self.keys = None if keys is None else torch.tensor(sorted(int(k) for k in keys), dtype=torch.int64)
        self.num_classes = manifest.num_samples if self.keys is None else len(self.keys)

    def __call__(self, batch: dict) -> torch.Tensor:
        index = batch["index"]
        if self.keys is None:
            label = index
        else:
            keys = self.keys.to(index.device)
            pos = torch.searchsorted(keys, index).clamp(max=len(keys) - 1)
            label = torch.where(keys[pos] == index, pos, torch.full_like(pos, -1))  # -1: not a listed key
        bad = (label < 0) | (label >= self.num_classes)
        if bool(bad.any()):
            key = batch["key"][int(bad.nonzero()[0, 0])]
            raise RuntimeFault(f"labels=instance: sample key {key!r} is not an instance id of {self.manifest.dataset} "
                               f"({self.num_classes} instances)")
        return label
