"""Feature sets of weight vectors (one row per network).

- ``raw``: the flattened weights in the reader's fixed layout (:mod:`mlds.zoo.reader`).
- ``stats``: per weight and bias tensor, mean, variance and the quantiles 0, 25, 50, 75, 100
  (Unterthiner et al. 2020, "Predicting Neural Network Accuracy from Weights"): 7 numbers per
  tensor, invariant to hidden-unit permutations (not to the sign flips of recurrent units).
- ``io``: ``stats`` plus finer statistics along the axes that hidden-unit permutations do *not*
  touch: for every input of the first layer (GRU/LSTM: every gate block of ``rnn.weight_ih_l0``
  and every input bit; conv: every input channel and kernel position of ``features.0``) the 7
  statistics over the hidden units, and for every output of the last layer the 7 statistics of
  its weights over the hidden units, and its bias -- all of the canonical form (recurrent units'
  signs fixed, :mod:`mlds.analysis.canonical`), so invariant to hidden permutations and sign flips.
- ``canon``: ``raw`` after canonicalisation (hidden units sorted, recurrent signs fixed;
  :mod:`mlds.analysis.canonical`).
- ``delta``: ``raw`` minus the network's *initial* weights. MLDS can regenerate these from the
  seed (PyTorch's default init under ``torch.manual_seed(seed)``,
  :func:`mlds.nets.registry.init_state_dict`), so this shows what training wrote into the
  weights; zoos that do not fix initialisations by seed cannot offer it, so numbers on it are
  not comparable with published ones.
- ``delta_io``: ``io`` of ``delta`` put through the trained network's canonicalising transformation
  (MLDS-specific, like ``delta``).
- ``units``: per hidden unit, what belongs to it, layer by layer (:mod:`mlds.analysis.unit_sets`;
  rows permute with the units: the input of the ``deepsets`` model).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mlds.analysis.canonical import apply_transform, canonical_transform, unit_groups
from mlds.analysis.data import Group, from_state_dicts

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
STAT_NAMES = ("mean", "var", "q0", "q25", "q50", "q75", "q100")


def raw(group: Group) -> np.ndarray:
    return group.vectors.numpy().copy()


def _stats_along(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The 7 statistics of ``t`` along ``dim`` (which becomes the statistics axis)."""
    t = t.to(torch.float64)
    q = torch.quantile(t, torch.tensor(QUANTILES, dtype=torch.float64), dim=dim).movedim(0, dim)
    return torch.cat([t.mean(dim, keepdim=True), t.var(dim, unbiased=False, keepdim=True), q], dim)


def _stats(group: Group, vectors: torch.Tensor) -> torch.Tensor:
    return torch.cat([_stats_along(vectors[:, s.start:s.stop], 1) for s in group.layout], dim=1)


def stats(group: Group) -> np.ndarray:
    """``[N, 7 * tensors]``: mean, variance, quantiles 0/25/50/75/100 of every tensor, in layout order."""
    return _stats(group, group.vectors).numpy()


def _io(group: Group, vectors: torch.Tensor) -> torch.Tensor:
    """Per input of the first layer and per output of the last layer: statistics over the hidden units."""
    n = len(group)
    weights = {s.name: vectors[:, s.start:s.stop].reshape(n, *s.shape) for s in group.layout}
    groups = unit_groups(group.spec)
    first, last = groups[0].incoming[0], groups[-1].outgoing[-1]
    w = weights[first.name]                                    # [N, blocks * H, *inputs]
    w = w.reshape(n, first.blocks, groups[0].size, *w.shape[2:])
    out = weights[last.name]                                   # [N, outputs, H]
    bias = weights[last.name.rsplit(".", 1)[0] + ".bias"].to(torch.float64)
    return torch.cat([_stats_along(w, 2).reshape(n, -1), _stats_along(out, 2).reshape(n, -1), bias], dim=1)


def _canonical(group: Group, vectors: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, P]``: ``vectors`` (default: the weights) put through each trained network's canonicalising
    transformation (a linear map: permutations and sign flips)."""
    perms, signs = canonical_transform(group.state_dicts(), group.spec)
    n = len(group)
    target = group.vectors if vectors is None else vectors
    weights = {s.name: target[:, s.start:s.stop].reshape(n, *s.shape) for s in group.layout}
    return from_state_dicts(group, apply_transform(weights, group.spec, perms, signs))


def io(group: Group) -> np.ndarray:
    """``stats`` plus the first layer's per-input and the last layer's per-output statistics (and bias),
    all of the canonical form."""
    c = _canonical(group)
    return torch.cat([_stats(group, c), _io(group, c)], dim=1).numpy()


def stat_names(group: Group) -> list[str]:
    return [f"{slot.name}:{s}" for slot in group.layout for s in STAT_NAMES]


def canon(group: Group) -> np.ndarray:
    return _canonical(group).numpy()


def initial_vectors(group: Group) -> torch.Tensor:
    """``[N, P]``: each network's initial weights (regenerated from its seed)."""
    from mlds.nets.registry import init_state_dict
    from mlds.zoo.reader import flatten
    cache: dict[int, torch.Tensor] = {}
    rows = []
    for seed in group.seeds.tolist():
        if seed not in cache:
            cache[seed] = flatten(init_state_dict(group.spec, int(seed)), group.layout)
        rows.append(cache[seed])
    return torch.stack(rows)


def delta(group: Group) -> np.ndarray:
    return (group.vectors - initial_vectors(group)).numpy()


def delta_io(group: Group) -> np.ndarray:
    d = _canonical(group, group.vectors - initial_vectors(group))
    return torch.cat([_stats(group, d), _io(group, d)], dim=1).numpy()


def units(group: Group) -> np.ndarray:
    from mlds.analysis.unit_sets import unit_features
    return unit_features(group)[0]


FEATURES: dict[str, Callable[[Group], np.ndarray]] = {"raw": raw, "stats": stats, "io": io, "canon": canon,
                                                      "delta": delta, "delta_io": delta_io, "units": units}
DESCRIPTIONS = {
    "raw": "flattened weights (reader layout)",
    "stats": "per-tensor mean, variance, quantiles 0/25/50/75/100 (Unterthiner et al. 2020)",
    "io": "stats + per-input (first layer) and per-output (last layer) statistics over hidden units and the "
          "output bias, of the canonical form (invariant to hidden permutations and recurrent sign flips)",
    "canon": "flattened weights in canonical form (recurrent unit signs fixed, hidden units sorted by incoming "
             "norm)",
    "delta": "flattened weights minus the initial weights regenerated from the seed (MLDS-specific)",
    "delta_io": "io features of the change from the initial weights (MLDS-specific)",
    "units": "per hidden unit, layer by layer: its incoming weights (raw on the network inputs, else 7 statistics "
             "per gate block) and outgoing weights (raw into the outputs, else 7 statistics), after the canonical "
             "sign fix; the input of the deepsets model",
}


def compute(group: Group, names) -> dict[str, np.ndarray]:
    """``{name: [N, F]}`` for the requested feature sets (unknown names raise)."""
    unknown = sorted(set(names) - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown feature sets {unknown}; known: {', '.join(FEATURES)}")
    return {n: FEATURES[n](group) for n in names}
