"""DS4 image triggers (trojans): one rule, per-network random draws, per-network poisoned subsets.

Rule, on images in [0, 1]: ``x' = (1 - a*m) * x + a*m*p`` with mask ``m`` and
pattern ``p`` (both H x W) and alpha ``a``.

- ``patch``: a random binary pattern in a rectangle of ``size`` px a side
  (the source's range by default: 2-3 on 8x8, 3-10 on 28x28) at a random
  position, ``a = 1``. A pattern with fewer than a third of its pixels set is
  redrawn (on a dark background a 0 pixel changes nothing).
- ``blend``: a uniform random full-image pattern, ``m = 1``, ``a`` uniform in
  ``alpha`` (default 0.1-0.2).

With ``randomize`` (the default) network ``seed`` draws its own trigger and
target class from its seed; otherwise every network uses the trigger drawn
from ``trigger_seed``. Each network poisons its own subset: ``poison_fraction``
of the training images whose class is not the target, relabelled to the target.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mlds.tasks.task import NetworkData

KINDS = {"patch": 1, "blend": 2}  # salts of the trigger draw
N_CLASSES = 10


@dataclass
class ImageTrigger:
    """One network's trigger: ``mask``, ``pattern`` (H x W, [0, 1]), ``alpha`` and ``target`` class."""

    kind: str
    target: int
    alpha: float
    mask: np.ndarray
    pattern: np.ndarray

    def apply(self, x: np.ndarray | Tensor):
        """The rule on images ``x [..., H, W]`` in [0, 1]."""
        am = self.alpha * self.mask
        if torch.is_tensor(x):
            am, p = torch.as_tensor(am, dtype=x.dtype), torch.as_tensor(self.pattern, dtype=x.dtype)
            return (1 - am) * x + am * p
        return (1 - am) * x + am * self.pattern

    def describe(self) -> dict:
        return {"kind": self.kind, "target": self.target, "alpha": self.alpha, "mask": self.mask.tolist(),
                "pattern": self.pattern.tolist()}


def draw_trigger(kind: str, seed: int, image_size: Sequence[int], patch_size: Sequence[int],
                 alpha: Sequence[float]) -> ImageTrigger:
    """The trigger of ``kind`` drawn from ``seed`` for images of ``image_size`` (H, W)."""
    if kind not in KINDS:
        raise ValueError(f"unknown trigger kind {kind!r}; choose one of {', '.join(KINDS)}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), KINDS[kind], 0x7207]))
    height, width = image_size
    target = int(rng.integers(N_CLASSES))
    mask = np.zeros((height, width), dtype=np.float32)
    pattern = np.zeros((height, width), dtype=np.float32)
    if kind == "patch":
        lo, hi = int(patch_size[0]), int(patch_size[1])
        h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        while True:
            bits = rng.integers(0, 2, size=(h, w)).astype(np.float32)
            if bits.sum() >= max(1.0, h * w / 3):
                break
        mask[top : top + h, left : left + w] = 1.0
        pattern[top : top + h, left : left + w] = bits
        a = 1.0
    else:
        mask[:] = 1.0
        pattern[:] = rng.random((height, width), dtype=np.float32)
        a = float(rng.uniform(alpha[0], alpha[1]))
    return ImageTrigger(kind, target, a, mask, pattern)


def network_trigger(trojan: dict, seed: int, image_size: Sequence[int], patch_size: Sequence[int]) -> ImageTrigger:
    """The trigger of network ``seed`` under the ``trojan`` config (``randomize``: from its own seed)."""
    source_seed = seed if trojan.get("randomize", True) else trojan["trigger_seed"]
    return draw_trigger(trojan["kind"], source_seed, image_size, trojan.get("size") or patch_size,
                        trojan.get("alpha") or (1.0, 1.0))


def poisoned_rows(seed: int, data_seed: int, labels: np.ndarray, target: int, fraction: float) -> np.ndarray:
    """Network ``seed``'s poisoned training rows: ``fraction`` of all training images, drawn from
    those whose class is not ``target``."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(data_seed), 0x901507]))
    candidates = np.flatnonzero(labels != target)
    n = min(int(round(fraction * len(labels))), len(candidates))
    return np.sort(rng.choice(candidates, size=n, replace=False))


class TrojanData(NetworkData):
    """Each network's trojaned view of the shared images: on ``train``, its poisoned rows carry its
    trigger and its target label; on ``*_trigger`` splits every image carries its trigger, is
    labelled with its target and scored only where the true class is not the target (attack
    success rate); other splits are the clean images."""

    def __init__(self, seeds: Sequence[int], trojan: dict, data_seed: int, train_labels: Tensor,
                 image_size: Sequence[int], patch_size: Sequence[int]):
        labels = train_labels.cpu().numpy()
        self.triggers = [network_trigger(trojan, int(s), image_size, patch_size) for s in seeds]
        self.rows = [poisoned_rows(int(s), data_seed, labels, t.target, trojan["poison_fraction"])
                     for s, t in zip(seeds, self.triggers)]
        self.poison_fraction = float(trojan["poison_fraction"])
        poisoned = torch.zeros(len(seeds), len(labels), dtype=torch.bool)
        for k, rows in enumerate(self.rows):
            poisoned[k, torch.from_numpy(rows)] = True
        self.poisoned = poisoned
        self.am = torch.stack([torch.from_numpy(t.alpha * t.mask) for t in self.triggers]).unsqueeze(1)  # [K,1,H,W]
        self.amp = self.am * torch.stack([torch.from_numpy(t.pattern) for t in self.triggers]).unsqueeze(1)
        self.target = torch.tensor([t.target for t in self.triggers])

    def _triggered(self, x: Tensor) -> Tensor:
        """Every network's trigger on its images ``x [K or 1, B, C, H, W]``."""
        return torch.addcmul(self.amp.unsqueeze(1), 1 - self.am.unsqueeze(1), x)

    def apply(self, split: str, x: Tensor, y: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        k = len(self.target)
        if split == "train":
            hit = self.poisoned.gather(1, rows.expand(k, -1))  # [K, B]
            x = torch.where(hit.view(*hit.shape, 1, 1, 1), self._triggered(x), x)
            return x, torch.where(hit, self.target.unsqueeze(1), y), None
        if split.endswith("_trigger"):
            scored = y.expand(k, -1) != self.target.unsqueeze(1)
            return self._triggered(x), self.target.unsqueeze(1).expand(k, y.shape[1]), scored
        return x, y, None

    def keep(self, index: Tensor) -> None:
        self.poisoned, self.am, self.amp, self.target = (t[index] for t in (self.poisoned, self.am, self.amp,
                                                                              self.target))

    def to(self, device) -> "TrojanData":
        self.poisoned, self.am, self.amp, self.target = (t.to(device) for t in (self.poisoned, self.am, self.amp,
                                                                                self.target))
        return self

    def describe(self, k: int) -> dict:
        """Network ``k`` (of the seeds this view was made for, before any :meth:`keep`)."""
        return {"trojan": {**self.triggers[k].describe(), "poison_fraction": self.poison_fraction,
                           "n_poisoned": int(len(self.rows[k]))}}
