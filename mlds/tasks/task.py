"""Tasks: the fixed data a population trains on, and how a network is scored.

A task is one (dataset, task name, data_seed): every network of the task
trains on the same training set; the network seed only chooses initial
weights and batch order. Each split is generated from its own seed derived
from ``data_seed``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def split_rng(data_seed: int, split: str, salt: int = 0) -> np.random.Generator:
    """The generator of one split, derived from ``data_seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(data_seed), SPLIT_IDS[split], salt]))


@dataclass
class Split:
    """Inputs ``x [N, T, I]``, targets ``y`` (bits ``[N, T, O]`` or classes ``[N, T]``)
    and an optional bool ``mask [N, T]`` of the steps that are scored."""

    x: Tensor
    y: Tensor
    mask: Tensor | None = None

    def to(self, device) -> "Split":
        return Split(self.x.to(device), self.y.to(device), None if self.mask is None else self.mask.to(device))

    def __len__(self) -> int:
        return self.x.shape[0]


class NetworkData(ABC):
    """Each network's own version of a task's data, for the networks of one population.

    The data itself lives once (on the model's device); :meth:`apply` turns the
    rows gathered for every network into that network's version (DS4: its own
    trigger on its own poisoned subset), so a population never holds K copies.
    Network ``k`` here is network ``k`` of the population, and :meth:`keep`
    follows :meth:`mlds.nets.population.PopulationNet.keep` when networks retire.
    """

    @abstractmethod
    def apply(self, split: str, x: Tensor, y: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Network ``k``'s version of ``x [K or 1, B, ...]``, ``y [K or 1, B, ...]``: rows ``rows [K or 1, B]``
        of split ``split`` (``"train"`` or an evaluation split); returns ``(x [K, B, ...], y [K, B, ...],
        mask)``, ``mask [K, B]`` the rows each network is scored on (None: all)."""

    def describe(self, k: int) -> dict:
        """Fields of network ``k``'s ``meta.json`` that its own data adds (DS4: its ``trojan``)."""
        return {}

    @abstractmethod
    def keep(self, index: Tensor) -> None:
        """Keep only networks ``index`` (in that order)."""

    @abstractmethod
    def to(self, device) -> "NetworkData":
        """This data on ``device``."""


@dataclass
class Task:
    """Training data, evaluation splits and the scoring rule of one task.

    A network has converged when the loss on every split in ``stop_on``
    (validation splits) is below the stop threshold. ``network_data(seeds)``,
    where given, gives each network of a population its own version of the data
    (:class:`NetworkData`); without it every network sees the data as it is.
    """

    dataset: str
    name: str
    loss: str  # "bce": 0/1 targets per output bit; "ce": class index per step
    train: Split
    evals: dict[str, Split]
    stop_on: tuple[str, ...] = ("val",)
    description: dict = field(default_factory=dict)
    network_data: Callable[[Sequence[int]], NetworkData] | None = None
    meta: dict = field(default_factory=dict)  # fields every network's meta.json adds (DS4: input, trojan)

    def to(self, device) -> "Task":
        return Task(self.dataset, self.name, self.loss, self.train.to(device),
                    {k: v.to(device) for k, v in self.evals.items()}, self.stop_on, self.description,
                    self.network_data, self.meta)


def bce_terms(logits: Tensor, y: Tensor) -> Tensor:
    """``binary_cross_entropy_with_logits(logits, y, reduction="none")`` from fast operators
    (PyTorch's CPU ``log_sigmoid`` is slow): ``max(x, 0) - x * y - log(sigmoid(|x|))``."""
    return torch.addcmul(logits.clamp(min=0), logits, y, value=-1) - torch.sigmoid(logits.abs()).log()


def score(logits: Tensor, split_y: Tensor, mask: Tensor | None, loss: str) -> tuple[Tensor, Tensor]:
    """Per-network mean loss and accuracy ``([K], [K])`` of ``logits [K, N, ..., O]`` (sequences:
    ``[K, N, T, O]``; images: ``[K, N, O]``).

    Accuracy is per step (per image): all output bits right (bce) or the right
    class (ce), averaged over the scored steps (``mask``: shaped like ``logits``
    without its last dimension, the first one optional: one mask for all networks,
    or one per network).
    """
    y = split_y.expand(logits.shape if loss == "bce" else logits.shape[:-1])
    if loss == "bce":
        per_step = bce_terms(logits, y).mean(-1)
        correct = ((logits > 0) == (y > 0.5)).all(-1)
    elif loss == "ce":
        per_step = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(logits.shape[:-1])
        correct = logits.argmax(-1) == y
    else:
        raise ValueError(f"unknown loss {loss!r}")
    dims = tuple(range(1, per_step.dim()))
    if mask is None:
        return per_step.mean(dims), correct.float().mean(dims)
    m = mask.to(per_step.dtype).expand(per_step.shape)
    count = m.sum(dims).clamp(min=1)
    return (per_step * m).sum(dims) / count, (correct * m).sum(dims) / count


class _BCEWithLogitsMean(torch.autograd.Function):
    """Per-network mean of ``binary_cross_entropy_with_logits(logits, y)`` over all but the
    first dimension: the loss :func:`score` computes, from a few fast
    element-wise operators (PyTorch's CPU ``log_sigmoid`` is slow) and with the
    gradient ``(sigmoid(logits) - y) / n`` written directly."""

    @staticmethod
    def forward(ctx, logits: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(logits, y)
        per = bce_terms(logits, y)
        return per.reshape(per.shape[0], -1).mean(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, y = ctx.saved_tensors
        n = logits[0].numel()
        scale = (grad / n).view(-1, *([1] * (logits.dim() - 1)))
        return torch.sigmoid(logits).sub_(y).mul_(scale), None


def training_loss(logits: Tensor, y: Tensor, mask: Tensor | None, loss: str) -> Tensor:
    """Per-network training loss ``[K]``: the loss of :func:`score` without the accuracy,
    which training does not need."""
    if loss == "bce" and mask is None and y.shape == logits.shape:
        return _BCEWithLogitsMean.apply(logits, y)
    if loss == "ce" and mask is None:
        per_step = F.cross_entropy(logits.flatten(0, -2), y.expand(logits.shape[:-1]).flatten(), reduction="none")
        return per_step.view(logits.shape[0], -1).mean(1)
    return score(logits, y, mask, loss)[0]
