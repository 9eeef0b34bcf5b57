"""Plain PyTorch reference networks: the form every stored network loads into.

Built only from ``torch.nn.GRU`` / ``LSTM`` / ``Conv2d`` / ``Linear`` / ``ReLU``, so the
state-dict names of a zoo sample are the standard ones: recurrent
``rnn.weight_ih_l0 ... rnn.bias_hh_l3, head.0.weight, head.0.bias, head.2.weight, ...``;
convolutional ``features.0.weight, features.0.bias, features.2.weight, ..., head.weight, head.bias``.
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


class ConvNet(nn.Module):
    """``num_layers`` convolutions (``kernel_size``, ``stride``, padding ``kernel_size // 2``) of
    ``channels`` channels with ReLU, global average pooling, then a linear layer to ``num_classes``.

    ``forward(x [B, in_channels, H, W]) -> logits [B, num_classes]``; state-dict names
    ``features.0.weight``, ``features.0.bias``, ``features.2.weight``, ..., ``head.weight``, ``head.bias``.
    """

    def __init__(self, in_channels: int, channels: int, num_layers: int, num_classes: int, kernel_size: int = 3,
                 stride: int = 2):
        super().__init__()
        for name, value in dict(in_channels=in_channels, channels=channels, num_layers=num_layers,
                                num_classes=num_classes, kernel_size=kernel_size, stride=stride).items():
            if int(value) < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, kernel_size, stride=stride,
                                 padding=kernel_size // 2), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    @classmethod
    def from_spec(cls, spec: dict) -> "ConvNet":
        """The network of an architecture config (``kind: conv``)."""
        return cls(**{k: spec[k] for k in ("in_channels", "channels", "num_layers", "num_classes", "kernel_size",
                                           "stride")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))
