"""The sequence tasks: DS1/DS2 device machines (with the DS2 trigger) and DS3 random automata.

Each split is generated from its own seed derived from ``data_seed``
(:func:`mlds.tasks.task.split_rng`), so every network of a task sees the same data.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from mlds.tasks.automata import generate_automaton, sample_sequences
from mlds.tasks.command_trigger import Trigger
from mlds.tasks.machines import Machine, random_commands
from mlds.tasks.task import Split, Task, split_rng


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
