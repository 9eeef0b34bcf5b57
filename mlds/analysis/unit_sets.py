"""Hidden units as sets: per-unit features and a learned permutation-invariant probe (DeepSets).

A network is a list of layers, each a *set* of interchangeable hidden units
(:func:`mlds.analysis.canonical.unit_groups`). :func:`unit_features` describes
every unit by what belongs to it (recurrent units after the canonical sign fix):

- its incoming weights, per gate block: raw where their other axis is fixed (the
  first layer's weights on the network inputs; single entries such as biases),
  else the 7 statistics of :mod:`mlds.analysis.features` (mean, variance,
  quantiles), which do not depend on the order of the previous layer's units;
- its outgoing weights: raw into the network outputs (the last hidden layer),
  else their 7 statistics.

So each layer is a ``[units, d]`` matrix whose rows permute with the units.
:class:`UnitSetModel` (DeepSets, Zaheer et al. 2017; the invariant baseline of
the weight-space literature) encodes every unit with an MLP shared within its
layer, pools each layer by mean and max over its units, and predicts from the
pooled vectors: invariant to hidden-unit order by construction (tested).
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn

from mlds.analysis.canonical import _split_units, apply_transform, canonical_transform, unit_groups
from mlds.analysis.data import Group
from mlds.analysis.features import _stats_along

Layout = list[tuple[str, int, int]]  # (layer, units, features per unit)


def unit_features(group: Group) -> tuple[np.ndarray, Layout]:
    """``([N, sum of units * d], layout)``: every layer's ``[units, d]`` matrix, flattened in layer order."""
    n = len(group)
    _, signs = canonical_transform(group.state_dicts(), group.spec)
    w = {k: v.to(torch.float64) for k, v in apply_transform(group.state_dicts(), group.spec, {}, signs).items()}
    groups = unit_groups(group.spec)
    blocks, layout = [], []
    for gi, g in enumerate(groups):
        cols = []
        for pi, part in enumerate(g.incoming):
            v, dim = _split_units(w[part.name], part, g.size)          # [N, blocks, units, *inputs]
            v = v.movedim(dim, 1).reshape(n, g.size, part.blocks, -1)   # [N, units, blocks, entries]
            fixed = (gi == 0 and pi == 0) or v.shape[-1] == 1
            cols.append((v if fixed else _stats_along(v, 3)).reshape(n, g.size, -1))
        for part in g.outgoing:
            v, dim = _split_units(w[part.name], part, g.size)          # [N, rows, 1, units, *rest]
            v = v.movedim(dim, 1).reshape(n, g.size, -1)                # [N, units, entries]
            into_outputs = gi == len(groups) - 1 and part is g.outgoing[-1]
            cols.append(v if into_outputs else _stats_along(v, 2))
        feat = torch.cat(cols, 2)
        blocks.append(feat.reshape(n, -1))
        layout.append((g.layer, g.size, feat.shape[2]))
    return torch.cat(blocks, 1).numpy(), layout


def layer_views(X: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """``X [N, F]`` as one ``[N, units, d]`` tensor per layer."""
    out, start = [], 0
    for _, units, d in layout:
        out.append(X[:, start:start + units * d].reshape(X.shape[0], units, d))
        start += units * d
    if start != X.shape[1]:
        raise ValueError(f"features have {X.shape[1]} columns, the unit layout {start}")
    return out


class _DeepSets(nn.Module):
    def __init__(self, layout: Layout, n_out: int, width: int):
        super().__init__()
        self.layout = layout
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
                                      for _, _, d in layout)
        self.head = nn.Sequential(nn.Linear(2 * width * len(layout), width), nn.ReLU(), nn.Linear(width, n_out))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        pooled = []
        for enc, units in zip(self.encoders, layer_views(X, self.layout)):
            e = enc(units)                                   # [N, units, width]
            pooled += [e.mean(1), e.amax(1)]
        return self.head(torch.cat(pooled, 1))


class UnitSetModel(BaseEstimator):
    """DeepSets probe on :func:`unit_features` (``layout`` from the same call): ``task="classify"``
    (``predict``, ``predict_proba``) or ``"regress"``. Features are standardised per layer and
    feature over all networks and units of the training set; full-batch Adam for ``epochs``
    steps with weight decay; deterministic for a given ``seed``."""

    def __init__(self, layout: Layout, task: str = "classify", width: int = 32, epochs: int = 300,
                 lr: float = 1e-2, weight_decay: float = 1e-2, seed: int = 0):
        self.layout = layout
        self.task = task
        self.width = width
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    def _views(self, X) -> list[torch.Tensor]:
        return layer_views(torch.as_tensor(np.asarray(X), dtype=torch.float32), self.layout)

    def _standardised(self, views: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([((v - m) / s).flatten(1) for v, m, s in zip(views, self.mean_, self.scale_)], 1)

    def fit(self, X, y):
        views = self._views(X)
        self.mean_ = [v.mean((0, 1)) for v in views]
        self.scale_ = [v.std((0, 1)).clamp(min=1e-8) for v in views]
        Xs = self._standardised(views)
        y = np.asarray(y)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.task == "classify":
                self.classes_, index = np.unique(y, return_inverse=True)
                target = torch.as_tensor(index)
                n_out, loss_fn = len(self.classes_), nn.functional.cross_entropy
            else:
                self.y_mean_, self.y_scale_ = float(y.mean()), float(y.std()) or 1.0
                target = torch.as_tensor((y - self.y_mean_) / self.y_scale_, dtype=torch.float32).unsqueeze(1)
                n_out, loss_fn = 1, nn.functional.mse_loss
            self.net_ = _DeepSets(self.layout, n_out, self.width)
            opt = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            for _ in range(self.epochs):
                opt.zero_grad()
                loss_fn(self.net_(Xs), target).backward()
                opt.step()
        return self

    @torch.no_grad()
    def _out(self, X) -> torch.Tensor:
        return self.net_(self._standardised(self._views(X)))

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(self._out(X), 1).numpy()

    def predict(self, X) -> np.ndarray:
        out = self._out(X)
        if self.task == "classify":
            return self.classes_[out.argmax(1).numpy()]
        return out[:, 0].numpy() * self.y_scale_ + self.y_mean_
