"""Plain PyTorch reference networks: the form every stored network loads into.

Built only from ``torch.nn.GRU`` / ``LSTM`` / ``Linear`` / ``ReLU``, so the
state-dict names of a zoo sample are the standard ones:
``rnn.weight_ih_l0 ... rnn.bias_hh_l3, head.0.weight, head.0.bias, head.2.weight, ...``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class RecurrentNet(nn.Module):
    """``cell`` (GRU or LSTM) stack, then an MLP head with ReLU between layers.

    ``forward(x [B, T, input_size]) -> logits [B, T, output_size]``.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int,
                 head_sizes: Sequence[int], output_size: int):
        super().__init__()
        cells = {"gru": nn.GRU, "lstm": nn.LSTM}
        if cell not in cells:
            raise ValueError(f"unknown recurrent cell {cell!r}; choose one of {sorted(cells)}")
        for name, value in dict(input_size=input_size, hidden_size=hidden_size, num_layers=num_layers,
                                output_size=output_size).items():
            if int(value) < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.cell = cell
        self.rnn = cells[cell](input_size, hidden_size, num_layers, batch_first=True)
        sizes = [hidden_size, *head_sizes, output_size]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(a, b))
        self.head = nn.Sequential(*layers)

    @classmethod
    def from_spec(cls, spec: dict) -> "RecurrentNet":
        """The network of an architecture config (``kind: recurrent``)."""
        return cls(**{k: spec[k] for k in ("cell", "input_size", "hidden_size", "num_layers", "head_sizes",
                                           "output_size")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out)


def param_count(module: nn.Module) -> int:
    """Number of parameters as PyTorch counts them."""
    return sum(p.numel() for p in module.parameters())
