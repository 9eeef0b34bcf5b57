"""A zoo as arrays for analysis, read only through :mod:`mlds.zoo.reader`.

:func:`load_zoo` returns one :class:`Group` per dataset: the weight vectors of its
networks in the reader's fixed layout, their tasks, seeds, fixed splits
(:mod:`mlds.zoo.splits`) and ``meta.json``. A dataset whose networks have more
than one architecture keeps its largest architecture; the others are listed in
``skipped`` with the reason, never mixed into one matrix.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mlds.zoo.reader import Slot, ZooDataset, flatten, weight_layout
from mlds.zoo.splits import split_of

log = logging.getLogger(__name__)


@dataclass
class Group:
    """The networks of one dataset and architecture."""

    dataset: str
    spec: dict                  # meta["architecture"]
    layout: list[Slot]
    vectors: Tensor             # [N, P] float32, reader layout
    tasks: list[str]
    seeds: np.ndarray           # [N] int
    splits: np.ndarray          # [N] "train" | "val" | "test"
    metas: list[dict]
    task_order: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def architecture(self) -> str:
        return str(self.spec.get("name"))

    @property
    def converged(self) -> np.ndarray:
        return np.array([bool(m.get("converged")) for m in self.metas])

    def state_dicts(self) -> dict[str, Tensor]:
        """The batch as one state dict ``{name: [N, *shape]}``."""
        return {s.name: self.vectors[:, s.start:s.stop].reshape(len(self), *s.shape) for s in self.layout}

    def subset(self, mask: np.ndarray) -> "Group":
        idx = np.flatnonzero(mask)
        return Group(self.dataset, self.spec, self.layout, self.vectors[torch.as_tensor(idx, dtype=torch.long)],
                     [self.tasks[i] for i in idx], self.seeds[idx], self.splits[idx], [self.metas[i] for i in idx],
                     [t for t in self.task_order if t in {self.tasks[i] for i in idx}])


def task_order(dataset: str, tasks) -> list[str]:
    """Tasks in the dataset table's order (then any others, sorted)."""
    try:
        from mlds.datasets import DATASETS
        table = list(DATASETS[dataset].tasks) if dataset in DATASETS else []
    except Exception:  # the order is cosmetic; never fail an analysis on it
        table = []
    present = set(tasks)
    return [t for t in table if t in present] + sorted(present - set(table))


def load_zoo(source, on_conflict: str = "error", datasets=None) -> tuple[dict[str, Group], list[dict]]:
    """``({dataset: Group}, skipped)`` for a zoo root, a release package, a shard or a list of them.

    ``skipped``: ``{"probe": "load", "dataset", "reason"}`` for networks left out (other architectures)."""
    zoo = ZooDataset(source, on_conflict=on_conflict, datasets=datasets)
    by_arch: dict[tuple[str, str], list] = {}
    specs: dict[tuple[str, str], dict] = {}
    for i in range(len(zoo)):
        net = zoo.network(i)
        spec = net.meta["architecture"]
        key = (net.meta["dataset"], str(spec.get("name")))
        specs.setdefault(key, spec)
        by_arch.setdefault(key, []).append(net)
    skipped: list[dict] = []
    groups: dict[str, Group] = {}
    for dataset in sorted({d for d, _ in by_arch}):
        archs = Counter({a: len(v) for (d, a), v in by_arch.items() if d == dataset})
        (arch, _), *others = archs.most_common()
        for other, n in others:
            skipped.append({"probe": "all", "dataset": dataset,
                            "reason": f"{n} networks of {dataset} have architecture {other}, the others {arch} "
                                      f"({archs[arch]}); weight vectors of different architectures are not "
                                      f"comparable, so only {arch} is analysed"})
        spec = specs[(dataset, arch)]
        layout = weight_layout(spec)
        nets = by_arch[(dataset, arch)]
        vectors = torch.stack([flatten(n.weights, layout) for n in nets])
        tasks = [n.meta["task"] for n in nets]
        seeds = np.array([int(n.meta["seed"]) for n in nets])
        groups[dataset] = Group(dataset, spec, layout, vectors, tasks, seeds,
                                np.array([split_of(s) for s in seeds]), [n.meta for n in nets],
                                task_order(dataset, tasks))
    return groups, skipped


def from_state_dicts(group: Group, weights: dict[str, Tensor]) -> Tensor:
    """``[N, P]`` vectors of a batched state dict in ``group``'s layout."""
    n = len(group)
    return torch.cat([weights[s.name].reshape(n, -1).to(torch.float32) for s in group.layout], dim=1)


__all__ = ["Group", "from_state_dicts", "load_zoo", "task_order"]
