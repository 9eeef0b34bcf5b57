"""Permutation (and sign) symmetry of hidden units: canonical forms and random transformations.

Reordering the hidden units of a layer -- and moving with each unit everything
that belongs to it -- gives another weight vector of the *same function*. Which
tensors move together, per architecture kind (``meta["architecture"]``):

- recurrent (``nn.GRU`` / ``nn.LSTM``, then an MLP head): the H units of layer l
  own one row in *every gate block* of ``rnn.weight_ih_l{l}``, ``rnn.weight_hh_l{l}``,
  ``rnn.bias_ih_l{l}``, ``rnn.bias_hh_l{l}`` (3 blocks r, z, n for GRU; 4 blocks i, f, g, o
  for LSTM), one *column* of ``rnn.weight_hh_l{l}`` (its own recurrence), and one
  column of the next layer's input weights (``rnn.weight_ih_l{l+1}``, or ``head.0.weight``
  after the last layer). Each hidden linear layer ``head.{2i}`` of the head owns a row
  of its weight and bias and a column of ``head.{2i+2}.weight``.
- conv (``features.{2i}`` convolutions, global average pooling, ``head``): each
  output channel of a convolution owns its filter and bias and an input channel of
  the next convolution (or a column of ``head.weight``).

Recurrent units also have a *sign* symmetry: ``tanh`` is odd, so negating the
rows of a unit's candidate block (GRU ``n``: ``W_in``, ``W_hn``, ``b_in``, ``b_hn``;
LSTM ``g``: ``W_ig``, ``W_hg``, ``b_ig``, ``b_hg``) negates its state ``h_j`` (and the
LSTM cell ``c_j``) at every step; negating the unit's columns in ``weight_hh`` and in
the next layer's input weights undoes it. The ReLU layers of the heads and of
the convolutions have no such symmetry (only positive rescaling, not handled).

:func:`canonicalize` goes through the layers from the input. In a recurrent
layer it first chooses each unit's sign so that the sum of its candidate-block
input weights (``weight_ih`` row) is positive -- that row only depends on the
previous layer's units, already canonical, so the choice is well defined -- then
it sorts the units of every layer by the L2 norm of what flows *into* them (all
their rows: every gate block, weights and biases), largest first. Neither key
changes when the units of the previous layer are permuted or negated, so all
networks that differ by hidden permutations and sign flips have the same
canonical form (up to ties). :func:`permute` applies random permutations and sign
flips (augmentation; tests). All work on a batch of networks at once: a state
dict whose tensors have a leading network dimension ``[N, *shape]``.
:func:`canonical_transform` returns the signs and orders themselves, so that
the same transformation can be applied to related tensors (e.g. the change
from the initial weights, :func:`apply_transform`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Part:
    """A tensor slice that belongs to a unit: ``name``'s ``axis`` indexes the units, in ``blocks`` blocks."""

    name: str
    axis: int
    blocks: int = 1


@dataclass(frozen=True)
class UnitGroup:
    """One layer's interchangeable hidden units: ``incoming`` parts (define the sort key and move) and
    ``outgoing`` parts (only move)."""

    layer: str
    size: int
    incoming: tuple[Part, ...]
    outgoing: tuple[Part, ...]
    sign_block: int | None = None   # gate block whose incoming rows a sign flip negates (None: no sign symmetry)


GATES = {"gru": 3, "lstm": 4}
#: the gate block through ``tanh`` (GRU r, z, n: n; LSTM i, f, g, o: g)
CANDIDATE = {"gru": 2, "lstm": 2}


def unit_groups(spec: dict) -> list[UnitGroup]:
    """The permutable hidden-unit groups of an architecture, in order from the input."""
    kind = spec.get("kind")
    groups: list[UnitGroup] = []
    if kind == "recurrent":
        cell, layers, hidden = spec["cell"], int(spec["num_layers"]), int(spec["hidden_size"])
        if cell not in GATES:
            raise ValueError(f"unknown recurrent cell {cell!r}")
        g = GATES[cell]
        for k in range(layers):
            nxt = Part(f"rnn.weight_ih_l{k + 1}", 1) if k + 1 < layers else Part("head.0.weight", 1)
            groups.append(UnitGroup(
                f"rnn.l{k}", hidden,
                (Part(f"rnn.weight_ih_l{k}", 0, g), Part(f"rnn.weight_hh_l{k}", 0, g),
                 Part(f"rnn.bias_ih_l{k}", 0, g), Part(f"rnn.bias_hh_l{k}", 0, g)),
                (Part(f"rnn.weight_hh_l{k}", 1), nxt), CANDIDATE[cell]))
        for i, size in enumerate(spec["head_sizes"]):
            groups.append(UnitGroup(f"head.{2 * i}", int(size),
                                    (Part(f"head.{2 * i}.weight", 0), Part(f"head.{2 * i}.bias", 0)),
                                    (Part(f"head.{2 * i + 2}.weight", 1),)))
    elif kind == "conv":
        layers, channels = int(spec["num_layers"]), int(spec["channels"])
        for i in range(layers):
            nxt = Part(f"features.{2 * i + 2}.weight", 1) if i + 1 < layers else Part("head.weight", 1)
            groups.append(UnitGroup(f"features.{2 * i}", channels,
                                    (Part(f"features.{2 * i}.weight", 0), Part(f"features.{2 * i}.bias", 0)),
                                    (nxt,)))
    else:
        raise ValueError(f"no permutation symmetry known for architecture kind {kind!r}")
    return groups


def _split_units(t: Tensor, part: Part, size: int) -> tuple[Tensor, int]:
    """``t [N, *shape]`` viewed as ``[N, *pre, blocks, size, *post]``, and the dimension of ``size``."""
    shape = t.shape[1:]
    if shape[part.axis] != part.blocks * size:
        raise ValueError(f"{part.name} has {shape[part.axis]} entries on axis {part.axis}, "
                         f"expected {part.blocks} x {size}")
    pre, post = shape[:part.axis], shape[part.axis + 1:]
    return t.reshape(t.shape[0], *pre, part.blocks, size, *post), 1 + len(pre) + 1


def _apply(t: Tensor, part: Part, perm: Tensor) -> Tensor:
    """``t [N, *shape]`` with its units on ``part.axis`` reordered by ``perm [N, size]`` (new unit j = old perm[j])."""
    v, dim = _split_units(t, part, perm.shape[1])
    view = [perm.shape[0]] + [1] * (v.dim() - 1)
    view[dim] = perm.shape[1]
    return v.gather(dim, perm.view(view).expand_as(v)).reshape(t.shape)


def _check(weights: dict[str, Tensor], groups: list[UnitGroup]) -> None:
    missing = sorted({p.name for g in groups for p in (*g.incoming, *g.outgoing)} - set(weights))
    if missing:
        raise ValueError(f"weights lack tensors of the architecture: {missing}")


def unit_norms(weights: dict[str, Tensor], group: UnitGroup) -> Tensor:
    """``[N, size]``: L2 norm of everything flowing into each unit (every incoming part, every block)."""
    total = None
    for part in group.incoming:
        v, dim = _split_units(weights[part.name].to(torch.float64), part, group.size)
        sq = v.pow(2).movedim(dim, 1).reshape(v.shape[0], group.size, -1).sum(-1)
        total = sq if total is None else total + sq
    return total.sqrt()


def _flip(t: Tensor, part: Part, sign: Tensor, block: int | None) -> Tensor:
    """``t`` with unit j's entries on ``part.axis`` multiplied by ``sign[:, j]`` (only in gate ``block``
    when given; every block otherwise)."""
    v, dim = _split_units(t, part, sign.shape[1])
    view = [sign.shape[0]] + [1] * (v.dim() - 1)
    view[dim] = sign.shape[1]
    factor = sign.to(v.dtype).view(view)
    if block is None:
        return (v * factor).reshape(t.shape)
    v = v.clone()
    index = [slice(None)] * v.dim()
    index[dim - 1] = slice(block, block + 1)
    v[tuple(index)] = v[tuple(index)] * factor
    return v.reshape(t.shape)


def _transform_group(weights: dict[str, Tensor], g: UnitGroup, sign: Tensor | None, perm: Tensor | None) -> None:
    """In ``weights`` (a dict, replaced entries): flip the signs of ``g``'s units, then reorder them."""
    if sign is not None and g.sign_block is not None:
        for part in g.incoming:
            weights[part.name] = _flip(weights[part.name], part, sign, g.sign_block)
        for part in g.outgoing:
            weights[part.name] = _flip(weights[part.name], part, sign, None)
    if perm is not None:
        for part in (*g.incoming, *g.outgoing):
            weights[part.name] = _apply(weights[part.name], part, perm)


def apply_transform(weights: dict[str, Tensor], spec: dict, perms: dict[str, Tensor],
                    signs: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Batched state dict with each group's units negated by ``signs[layer]`` (``[N, size]`` of +-1; only
    groups with a sign symmetry) and then reordered by ``perms[layer]`` (``[N, size]``)."""
    groups = unit_groups(spec)
    _check(weights, groups)
    out = dict(weights)
    for g in groups:
        _transform_group(out, g, (signs or {}).get(g.layer), perms.get(g.layer))
    return out


def apply_permutations(weights: dict[str, Tensor], spec: dict, perms: dict[str, Tensor]) -> dict[str, Tensor]:
    """Batched state dict with each group's units reordered by ``perms[layer]`` (``[N, size]``)."""
    return apply_transform(weights, spec, perms)


def canonical_transform(weights: dict[str, Tensor], spec: dict) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(perms, signs)`` that bring a batch of networks into canonical form (see the module docstring)."""
    groups = unit_groups(spec)
    _check(weights, groups)
    work = dict(weights)
    perms, signs = {}, {}
    for g in groups:
        sign = None
        if g.sign_block is not None:
            first = g.incoming[0]
            v, dim = _split_units(work[first.name], first, g.size)   # [N, blocks, size, inputs]
            total = v.select(dim - 1, g.sign_block).to(torch.float64).reshape(v.shape[0], g.size, -1).sum(-1)
            sign = torch.where(total < 0, -1.0, 1.0)
            signs[g.layer] = sign
        _transform_group(work, g, sign, None)
        perm = torch.sort(unit_norms(work, g), dim=1, descending=True, stable=True).indices
        perms[g.layer] = perm
        _transform_group(work, g, None, perm)
    return perms, signs


def canonical_permutations(weights: dict[str, Tensor], spec: dict) -> dict[str, Tensor]:
    """Per layer, the ``[N, size]`` order that sorts its units by incoming norm, largest first (stable)."""
    return canonical_transform(weights, spec)[0]


def canonicalize(weights: dict[str, Tensor], spec: dict) -> dict[str, Tensor]:
    """The canonical form of a batch of networks (``{name: [N, *shape]}``): recurrent units' signs fixed,
    every layer's hidden units sorted by the norm of their incoming weights, largest first. The function
    of every network is unchanged."""
    perms, signs = canonical_transform(weights, spec)
    return apply_transform(weights, spec, perms, signs)


def random_permutations(spec: dict, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Independent uniform permutations ``[n, size]`` of every unit group."""
    return {g.layer: torch.stack([torch.randperm(g.size, generator=generator) for _ in range(n)])
            for g in unit_groups(spec)}


def random_signs(spec: dict, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Independent uniform signs ``[n, size]`` for every unit group that has a sign symmetry."""
    return {g.layer: torch.randint(0, 2, (n, g.size), generator=generator).float() * 2 - 1
            for g in unit_groups(spec) if g.sign_block is not None}


def permute(weights: dict[str, Tensor], spec: dict, generator: torch.Generator | None = None,
            signs: bool = True) -> dict[str, Tensor]:
    """A batch of networks with all hidden units randomly permuted (and, where the layer allows it,
    negated): the same functions, other vectors."""
    n = next(iter(weights.values())).shape[0]
    return apply_transform(weights, spec, random_permutations(spec, n, generator),
                           random_signs(spec, n, generator) if signs else None)


def canonicalize_one(weights: dict[str, Tensor], spec: dict) -> dict[str, Tensor]:
    """:func:`canonicalize` of a single network's plain state dict."""
    return {k: v[0] for k, v in canonicalize({k: v.unsqueeze(0) for k, v in weights.items()}, spec).items()}
