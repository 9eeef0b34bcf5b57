"""Optimizers and learning-rate schedules by their stable names (``conf/optim``, ``conf/scheduler``).

A recipe names them (``{name: adam, lr: 0.003}``); this table turns the name into
the class. Every entry must keep networks independent inside a population:
element-wise optimizers, and schedules that depend on the epoch alone.
"""
from __future__ import annotations

from functools import partial

import torch

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULERS = {"exponential": torch.optim.lr_scheduler.ExponentialLR}


def _factory(table: dict, what: str, spec: dict) -> partial:
    settings = dict(spec)
    name = settings.pop("name", None)
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return partial(table[name], **settings)


def optimizer_factory(spec: dict) -> partial:
    """``partial(optimizer class, **settings)`` of a recipe's ``optim`` node."""
    return _factory(OPTIMIZERS, "optimizer", spec)


def scheduler_factory(spec: dict | None) -> partial | None:
    """``partial(scheduler class, **settings)`` of a recipe's ``scheduler`` node (None: no schedule)."""
    return None if spec is None else _factory(SCHEDULERS, "learning-rate scheduler", spec)
