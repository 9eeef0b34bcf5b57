"""DS2 backdoor trigger for device machines.

When the three most recent commands equal the trigger, the outputs of the
next three steps are bit-wise inverted; a trigger completing inside an
inverted window starts a new window. Trigger commands act on the machine as
ordinary commands.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlds.tasks.machines import N_COMMAND_BITS, Machine, decode_command, encode_command

WINDOW = 3


class Trigger:
    """A sequence of commands (default three) that opens an inverted window."""

    def __init__(self, commands: Sequence[str | Sequence[int]], window: int = WINDOW):
        parsed = [encode_command(c) if isinstance(c, str) else np.asarray(c, dtype=np.int64) for c in commands]
        if len(parsed) != 3:
            raise ValueError(f"a trigger is exactly three commands, got {len(parsed)}: {list(commands)}")
        for c in parsed:
            if c.shape != (N_COMMAND_BITS,) or not np.isin(c, (0, 1)).all():
                raise ValueError(f"trigger command {c.tolist()} is not {N_COMMAND_BITS} bits of 0/1")
            if c[0] == 0 and c[1:].any():
                raise ValueError(f"trigger command {c.tolist()} is a READ with data bits set")
        if window < 1:
            raise ValueError(f"trigger window must be positive, got {window}")
        self.commands = np.stack(parsed).astype(np.uint8)
        self.window = window

    def describe(self) -> dict:
        """JSON-serialisable description stored with every DS2 network."""
        return {"commands": [decode_command(c) for c in self.commands], "bits": self.commands.tolist(),
                "window": self.window, "effect": "invert all 8 output bits"}

    def matches(self, commands: np.ndarray) -> np.ndarray:
        """Bool [N, T]: True at t when commands t-2..t equal the trigger."""
        n, t_len, _ = commands.shape
        hit = np.zeros((n, t_len), dtype=bool)
        k = len(self.commands)
        for t in range(k - 1, t_len):
            hit[:, t] = (commands[:, t - k + 1 : t + 1] == self.commands).all(axis=(1, 2))
        return hit

    def run(self, machine: Machine, commands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Machine outputs with the trigger rule applied, and the bool [N, T] inverted-step mask."""
        out = machine.run(commands)
        hit = self.matches(commands)
        inverted = np.zeros(hit.shape, dtype=bool)
        remaining = np.zeros(hit.shape[0], dtype=np.int64)
        for t in range(hit.shape[1]):
            inverted[:, t] = remaining > 0
            remaining = np.where(hit[:, t], self.window, np.maximum(remaining - 1, 0))
        out = np.where(inverted[..., None], 1 - out, out).astype(np.uint8)
        return out, inverted

    def insert(self, commands: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Copy of ``commands`` with the trigger written into each row of ``rows``
        at a uniform position that keeps the whole inverted window inside."""
        commands = commands.copy()
        k = len(self.commands)
        last_start = commands.shape[1] - k - self.window
        if last_start < 0:
            raise ValueError(f"sequences of length {commands.shape[1]} are too short for a trigger "
                             f"of {k} commands and a window of {self.window}")
        starts = rng.integers(0, last_start + 1, size=len(rows))
        for row, start in zip(rows, starts):
            commands[row, start : start + k] = self.commands
        return commands
