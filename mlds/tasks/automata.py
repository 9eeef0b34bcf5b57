"""DS3 random automata: deterministic random Moore machines.

Each automaton is generated from an integer id via numpy's SeedSequence, so
the same id (and sizes) always yields the same automaton on every platform.

Guarantees of :func:`generate_automaton`:

* total transition table ``transitions[state, input] -> next_state``
  (self-loops allowed);
* a Hamiltonian cycle over all states (``cycle``, starting at state 0), with
  ``cycle_inputs[i]`` the input that moves ``cycle[i] -> cycle[(i+1) % S]``;
* Moore outputs ``outputs[state]`` using every output symbol;
* at least one *hidden* transition: between two different states that share
  the same output.

Sequences start in state 0; the target at step t is the output of the state
reached after consuming input t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Automaton", "generate_automaton", "sample_sequences"]

_SEED_TAG = 0x4D4C4453  # "MLDS"
START_STATE = 0


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _frozen_int_array(a: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}")
    arr = np.array(arr, dtype=np.int64, copy=True)
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Automaton:
    """Deterministic Moore machine with a recorded Hamiltonian cycle.

    Arrays are stored as read-only int64 copies. ``n_outputs`` is
    ``max(outputs) + 1``. Construction validates shapes, value ranges and that ``cycle``/``cycle_inputs`` describe a real
    Hamiltonian cycle starting at state 0 (raises ValueError otherwise).
    """

    automaton_id: int
    transitions: np.ndarray  # int64 [S, n_inputs] -> next state
    outputs: np.ndarray  # int64 [S] Moore output per state
    cycle: tuple[int, ...]  # Hamiltonian cycle, starts at 0, each state once
    cycle_inputs: tuple[int, ...]  # input taking cycle[i] -> cycle[(i+1) % S]

    def __post_init__(self) -> None:
        aid = _check_int("automaton_id", self.automaton_id, 0)
        trans = _frozen_int_array(self.transitions, "transitions", 2)
        outs = _frozen_int_array(self.outputs, "outputs", 1)
        s, k = trans.shape
        if s < 2 or k < 2:
            raise ValueError(f"transitions must be at least [2, 2], got {trans.shape}")
        if outs.shape != (s,):
            raise ValueError(f"outputs must have shape ({s},), got {outs.shape}")
        if trans.min() < 0 or trans.max() >= s:
            raise ValueError("transitions contain out-of-range states")
        if outs.min() < 0:
            raise ValueError("outputs must be non-negative")
        cycle = tuple(int(x) for x in self.cycle)
        cyc_in = tuple(int(x) for x in self.cycle_inputs)
        if sorted(cycle) != list(range(s)) or cycle[0] != START_STATE:
            raise ValueError("cycle must visit every state exactly once, starting at 0")
        if len(cyc_in) != s:
            raise ValueError(f"cycle_inputs must have length {s}")
        for i, (st, a) in enumerate(zip(cycle, cyc_in)):
            if not 0 <= a < k or trans[st, a] != cycle[(i + 1) % s]:
                raise ValueError(f"cycle_inputs[{i}]={a} does not move along the cycle")
        object.__setattr__(self, "automaton_id", aid)
        object.__setattr__(self, "transitions", trans)
        object.__setattr__(self, "outputs", outs)
        object.__setattr__(self, "cycle", cycle)
        object.__setattr__(self, "cycle_inputs", cyc_in)

    @property
    def n_states(self) -> int:
        return int(self.transitions.shape[0])

    @property
    def n_inputs(self) -> int:
        return int(self.transitions.shape[1])

    @property
    def n_outputs(self) -> int:
        """Output alphabet size, max(outputs) + 1 (all symbols used when generated)."""
        return int(self.outputs.max()) + 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Automaton):
            return NotImplemented
        return (
            self.automaton_id == other.automaton_id
            and np.array_equal(self.transitions, other.transitions)
            and np.array_equal(self.outputs, other.outputs)
            and self.cycle == other.cycle
            and self.cycle_inputs == other.cycle_inputs
        )

    __hash__ = object.__hash__

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run from state 0 on int inputs [N, T].

        Returns (states [N, T], outputs [N, T]), int64: the state reached after
        each input and its Moore output. Vectorised over N. Raises ValueError
        for non-2-D, non-integer or out-of-range inputs.
        """
        x = np.asarray(inputs)
        if x.ndim != 2:
            raise ValueError(f"inputs must be 2-D [N, T], got shape {x.shape}")
        if x.size and not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"inputs must be integers, got dtype {x.dtype}")
        x = x.astype(np.int64, copy=False)
        if x.size and (x.min() < 0 or x.max() >= self.n_inputs):
            raise ValueError(f"inputs must be in [0, {self.n_inputs})")
        n, t = x.shape
        states = np.empty((n, t), dtype=np.int64)
        cur = np.full(n, START_STATE, dtype=np.int64)
        for step in range(t):
            cur = self.transitions[cur, x[:, step]]
            states[:, step] = cur
        return states, self.outputs[states]

    def hidden_transitions(self) -> list[tuple[int, int, int]]:
        """All (state, input, next_state) with next_state != state and equal outputs."""
        src, inp = np.nonzero(
            (self.transitions != np.arange(self.n_states)[:, None])
            & (self.outputs[self.transitions] == self.outputs[:, None])
        )
        return [(int(s), int(a), int(self.transitions[s, a])) for s, a in zip(src, inp)]

    def to_dict(self) -> dict:
        """JSON-serialisable dict (plain ints and lists); inverse of from_dict."""
        return {
            "automaton_id": self.automaton_id,
            "n_states": self.n_states,
            "n_inputs": self.n_inputs,
            "n_outputs": self.n_outputs,
            "start_state": START_STATE,
            "transitions": self.transitions.tolist(),
            "outputs": self.outputs.tolist(),
            "cycle": list(self.cycle),
            "cycle_inputs": list(self.cycle_inputs),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Automaton":
        """Rebuild from to_dict() output; validates sizes and start_state."""
        a = cls(
            automaton_id=d["automaton_id"],
            transitions=np.asarray(d["transitions"], dtype=np.int64),
            outputs=np.asarray(d["outputs"], dtype=np.int64),
            cycle=tuple(d["cycle"]),
            cycle_inputs=tuple(d["cycle_inputs"]),
        )
        if d.get("start_state", START_STATE) != START_STATE:
            raise ValueError("only start_state 0 is supported")
        sizes = (d.get("n_states"), d.get("n_inputs"), d.get("n_outputs"))
        if sizes != (a.n_states, a.n_inputs, a.n_outputs):
            raise ValueError(
                f"declared sizes {sizes} do not match the tables "
                f"{(a.n_states, a.n_inputs, a.n_outputs)}"
            )
        return a


def generate_automaton(
    automaton_id: int, n_states: int = 16, n_inputs: int = 9, n_outputs: int = 4
) -> Automaton:
    """Deterministically generate automaton ``automaton_id`` (see module doc).

    Seeded by SeedSequence([0x4D4C4453, automaton_id]); the same arguments
    always give the same automaton. Raises ValueError unless all arguments are
    ints with automaton_id >= 0, n_states >= 2, n_inputs >= 2,
    2 <= n_outputs < n_states.
    """
    automaton_id = _check_int("automaton_id", automaton_id, 0)
    n_states = _check_int("n_states", n_states, 2)
    n_inputs = _check_int("n_inputs", n_inputs, 2)
    n_outputs = _check_int("n_outputs", n_outputs, 2)
    if n_outputs >= n_states:
        raise ValueError(f"n_outputs ({n_outputs}) must be < n_states ({n_states})")

    rng = np.random.default_rng(np.random.SeedSequence([_SEED_TAG, automaton_id]))
    s = n_states

    # Random total transition table.
    transitions = rng.integers(0, s, size=(s, n_inputs), dtype=np.int64)

    # Hamiltonian cycle: random cyclic order starting at 0, one input per edge.
    cycle = np.concatenate([[START_STATE], 1 + rng.permutation(s - 1)]).astype(np.int64)
    cycle_inputs = rng.integers(0, n_inputs, size=s, dtype=np.int64)
    transitions[cycle, cycle_inputs] = np.roll(cycle, -1)
    cycle_input_of = np.empty(s, dtype=np.int64)
    cycle_input_of[cycle] = cycle_inputs

    # Moore outputs: every symbol used once, the rest uniform, shuffled.
    outputs = rng.permutation(
        np.concatenate(
            [np.arange(n_outputs), rng.integers(0, n_outputs, size=s - n_outputs)]
        )
    ).astype(np.int64)

    # Guarantee a hidden transition: n_outputs < n_states, so two different
    # states share an output (pigeonhole); redirect a non-cycle input of one
    # of them to the other.
    hidden = (transitions != np.arange(s)[:, None]) & (
        outputs[transitions] == outputs[:, None]
    )
    if not hidden.any():
        same = outputs[:, None] == outputs[None, :]
        np.fill_diagonal(same, False)
        pairs = np.argwhere(same)
        src, dst = pairs[rng.integers(len(pairs))]
        free = np.array([a for a in range(n_inputs) if a != cycle_input_of[src]])
        transitions[src, free[rng.integers(len(free))]] = dst

    return Automaton(
        automaton_id=automaton_id,
        transitions=transitions,
        outputs=outputs,
        cycle=tuple(int(x) for x in cycle),
        cycle_inputs=tuple(int(x) for x in cycle_inputs),
    )


def sample_sequences(
    automaton: Automaton, n: int, seq_len: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random input symbols [n, seq_len] and target outputs [n, seq_len] (int64)."""
    n = _check_int("n", n, 0)
    seq_len = _check_int("seq_len", seq_len, 0)
    inputs = rng.integers(0, automaton.n_inputs, size=(n, seq_len), dtype=np.int64)
    _, targets = automaton.run(inputs)
    return inputs, targets
