"""Network kinds: how an architecture config becomes a plain module and a population.

An architecture config (``conf/architecture/*.yaml``, ``meta.json["architecture"]``)
names its ``kind`` (``recurrent``, ``conv``); the kind gives the plain reference module (the form every
stored network loads into, standard ``torch.nn`` state-dict names) and the
population model that trains K such networks as one. Building a network,
initialising it from a seed, the reader's vector layout and ``to_module`` all
go through this table; a new kind of network is one entry here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlds.nets.population import PopulationConvNet, PopulationNet, PopulationRecurrentNet
from mlds.nets.reference import ConvNet, RecurrentNet, param_count

__all__ = ["KINDS", "NetworkKind", "build", "init_state_dict", "network_kind", "param_count", "population",
           "population_from_seeds"]


@dataclass(frozen=True)
class NetworkKind:
    """One kind of network: its plain module and its population model (both built from the spec)."""

    name: str
    plain: type[nn.Module]
    population: type[PopulationNet]


KINDS: dict[str, NetworkKind] = {k.name: k for k in (
    NetworkKind("recurrent", RecurrentNet, PopulationRecurrentNet),
    NetworkKind("conv", ConvNet, PopulationConvNet),
)}


def network_kind(spec: dict) -> NetworkKind:
    """The kind named by an architecture spec (``spec["kind"]``)."""
    name = spec.get("kind")
    if name not in KINDS:
        raise ValueError(f"architecture {spec.get('name', '?')!r} has kind {name!r}; known kinds: "
                         f"{', '.join(sorted(KINDS))}")
    return KINDS[name]


def build(spec: dict) -> nn.Module:
    """The plain network of an architecture spec."""
    return network_kind(spec).plain.from_spec(spec)


def init_state_dict(spec: dict, seed: int) -> dict[str, Tensor]:
    """PyTorch's default initialisation of the plain network under ``torch.manual_seed(seed)``.

    This is the start of network ``seed``, whether trained alone or in a population.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build(spec)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def population(spec: dict, state_dicts: Sequence[dict[str, Tensor]]) -> PopulationNet:
    """K networks (plain state dicts) of ``spec`` as one population model."""
    return network_kind(spec).population(spec, state_dicts)


def population_from_seeds(spec: dict, seeds: Sequence[int]) -> PopulationNet:
    """A population whose network ``k`` starts from :func:`init_state_dict` of ``seeds[k]``."""
    return population(spec, [init_state_dict(spec, int(s)) for s in seeds])
