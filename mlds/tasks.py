"""Tasks: the fixed data a population trains on, and how a network is scored.

A task is one (dataset, task name, data_seed): every network of the task
trains on the same training set; the network seed only chooses initial
weights and batch order. Each split is generated from its own seed derived
from ``data_seed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mlds.automata import generate_automaton, sample_sequences
from mlds.machines import Machine, random_commands
from mlds.triggers import Trigger

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


@dataclass
class Task:
    """Training data, evaluation splits and the scoring rule of one task.

    A network has converged when the loss on every split in ``stop_on``
    (validation splits) is below the stop threshold.
    """

    dataset: str
    name: str
    loss: str  # "bce": 0/1 targets per output bit; "ce": class index per step
    train: Split
    evals: dict[str, Split]
    stop_on: tuple[str, ...] = ("val",)
    description: dict = field(default_factory=dict)

    def to(self, device) -> "Task":
        return Task(self.dataset, self.name, self.loss, self.train.to(device),
                    {k: v.to(device) for k, v in self.evals.items()}, self.stop_on, self.description)


def bce_terms(logits: Tensor, y: Tensor) -> Tensor:
    """``binary_cross_entropy_with_logits(logits, y, reduction="none")`` from fast operators
    (PyTorch's CPU ``log_sigmoid`` is slow): ``max(x, 0) - x * y - log(sigmoid(|x|))``."""
    return torch.addcmul(logits.clamp(min=0), logits, y, value=-1) - torch.sigmoid(logits.abs()).log()


def score(logits: Tensor, split_y: Tensor, mask: Tensor | None, loss: str) -> tuple[Tensor, Tensor]:
    """Per-network mean loss and accuracy ``([K], [K])`` of ``logits [K, N, T, O]``.

    Accuracy is per step: all output bits right (bce) or the right class (ce),
    averaged over the scored steps.
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
    if mask is None:
        return per_step.mean((1, 2)), correct.float().mean((1, 2))
    m = mask.to(per_step.dtype)
    count = m.sum().clamp(min=1)
    return (per_step * m).sum((1, 2)) / count, (correct * m).sum((1, 2)) / count


def _bits(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _trigger_free(trigger: Trigger, rng, n, seq_len, write_prob) -> np.ndarray:
    """Random commands in which the trigger never occurs."""
    commands = random_commands(rng, n, seq_len, write_prob)
    while (bad := trigger.matches(commands).any(axis=1)).any():
        commands[bad] = random_commands(rng, int(bad.sum()), seq_len, write_prob)
    return commands


def device_machine_task(dataset: str, machine: Machine, data_seed: int, n_train: int, n_val: int, n_test: int,
                        seq_len: int, write_prob: float, trigger: Trigger | None = None,
                        poison_fraction: float = 0.0) -> Task:
    """DS1 (no trigger) or DS2 (``trigger`` with ``poison_fraction`` of training sequences poisoned).

    DS2 adds ``val_trigger``/``test_trigger`` splits (trigger inserted in every
    sequence, scored on the inverted steps only) and stops only when the
    network reproduces the backdoor as well as the machine.
    """
    def labelled(commands):
        if trigger is None:
            return _bits(commands), _bits(machine.run(commands)), None
        out, inverted = trigger.run(machine, commands)
        return _bits(commands), _bits(out), torch.from_numpy(inverted)

    def split(name: str, n: int) -> tuple[np.ndarray, np.random.Generator]:
        rng = split_rng(data_seed, name)
        if trigger is None:
            return random_commands(rng, n, seq_len, write_prob), rng
        return _trigger_free(trigger, rng, n, seq_len, write_prob), rng

    train_cmd, rng = split("train", n_train)
    description = {"machine": machine.name}
    if trigger is not None:
        n_poison = int(round(poison_fraction * n_train))
        train_cmd = trigger.insert(train_cmd, rng.permutation(n_train)[:n_poison], rng)
        description.update(trigger=trigger.describe(), poison_fraction=poison_fraction, n_poisoned=n_poison)
    x, y, _ = labelled(train_cmd)
    train = Split(x, y)
    evals = {}
    for name, n in (("val", n_val), ("test", n_test)):
        cmd, rng = split(name, n)
        x, y, _ = labelled(cmd)
        evals[name] = Split(x, y)
        if trigger is not None:
            x, y, inverted = labelled(trigger.insert(cmd, np.arange(n), rng))
            evals[f"{name}_trigger"] = Split(x, y, inverted)
    stop_on = ("val",) if trigger is None else ("val", "val_trigger")
    return Task(dataset, machine.name, "bce", train, evals, stop_on, description)


def automaton_task(dataset: str, automaton: int, n_states: int, n_inputs: int, n_outputs: int, data_seed: int,
                   n_train: int, n_val: int, n_test: int, seq_len: int) -> Task:
    """DS3: one random automaton; one-hot inputs, the output class of the state reached as target."""
    machine = generate_automaton(int(automaton), n_states=n_states, n_inputs=n_inputs, n_outputs=n_outputs)

    def split(name: str, n: int) -> Split:
        inputs, targets = sample_sequences(machine, n, seq_len, split_rng(data_seed, name))
        x = F.one_hot(torch.from_numpy(inputs).long(), n_inputs).float()
        return Split(x, torch.from_numpy(targets).long())

    return Task(dataset, automaton_name(automaton), "ce", split("train", n_train),
                {"val": split("val", n_val), "test": split("test", n_test)}, ("val",),
                {"automaton": machine.to_dict()})


def automaton_name(automaton: int) -> str:
    """Task name of a DS3 automaton id: ``automaton_017``."""
    return f"automaton_{int(automaton):03d}"
