"""A population: K independent networks of one architecture as one batched model.

Parameters are the plain network's state dict with a leading network
dimension, so network ``k`` of the population is exactly
``{name: p[k] for name, p in population}`` under standard ``nn.GRU``/``nn.LSTM``/
``nn.Linear`` names and loads into :class:`mlds.architectures.RecurrentNet`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mlds.architectures import init_state_dict
from mlds.recurrent import recurrent_stack


class PopulationRecurrentNet(nn.Module):
    """K recurrent networks; ``forward(x [K or 1, B, T, I]) -> logits [K, B, T, O]``."""

    def __init__(self, spec: dict, state_dicts: Sequence[dict[str, Tensor]]):
        super().__init__()
        if not state_dicts:
            raise ValueError("a population needs at least one network")
        self.spec = dict(spec)
        self.names = list(state_dicts[0])
        self.params = nn.ParameterList(
            [nn.Parameter(torch.stack([sd[name] for sd in state_dicts])) for name in self.names])

    @classmethod
    def from_seeds(cls, spec: dict, seeds: Sequence[int]) -> "PopulationRecurrentNet":
        """Each network starts from PyTorch's default init under its own seed."""
        return cls(spec, [init_state_dict(spec, int(s)) for s in seeds])

    @property
    def size(self) -> int:
        return self.params[0].shape[0]

    def named(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.params))

    def forward(self, x: Tensor) -> Tensor:
        p = self.named()
        n_layers = self.spec["num_layers"]
        layers = [tuple(p[f"rnn.{kind}_l{i}"] for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                  for i in range(n_layers)]
        h = recurrent_stack(self.spec["cell"], x, layers)
        k, b, t, _ = h.shape
        out = h.reshape(k, b * t, -1)
        n_linear = len(self.spec["head_sizes"]) + 1
        for i in range(n_linear):
            if i:
                out = torch.relu(out)
            w, bias = p[f"head.{2 * i}.weight"], p[f"head.{2 * i}.bias"]
            out = torch.baddbmm(bias.unsqueeze(1), out, w.transpose(1, 2))
        return out.view(k, b, t, -1)

    def network_state_dict(self, k: int) -> dict[str, Tensor]:
        """Network ``k`` as a plain state dict (CPU copies)."""
        return {name: p[k].detach().cpu().clone() for name, p in self.named().items()}

    @torch.no_grad()
    def keep(self, index: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep only networks ``index`` (in that order), here and in ``optimizer``'s
        state, so that the kept networks continue exactly as before."""
        old = list(self.params)
        new = [nn.Parameter(p.detach()[index].clone()) for p in old]
        if optimizer is not None:
            replace = {id(o): n for o, n in zip(old, new)}
            for group in optimizer.param_groups:
                group["params"] = [replace.get(id(p), p) for p in group["params"]]
            for o, n in zip(old, new):
                state = optimizer.state.pop(o, None)
                if state is not None:
                    optimizer.state[n] = {key: (v[index].clone() if torch.is_tensor(v) and v.dim() > 0 else v)
                                          for key, v in state.items()}
        self.params = nn.ParameterList(new)
