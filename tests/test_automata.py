"""Property tests for mlds.tasks.automata (DS3 random automata)."""

import json
import math

import numpy as np
import pytest

from mlds.tasks.automata import Automaton, generate_automaton, sample_sequences

IDS = range(0, 300)
SIZES = [(5, 9, 4), (16, 9, 4), (32, 9, 4), (3, 2, 2), (16, 2, 15)]


def _all(sizes=SIZES, ids=IDS):
    for s, k, o in sizes:
        for i in ids:
            yield generate_automaton(i, n_states=s, n_inputs=k, n_outputs=o), (s, k, o)


def _reference_run(a: Automaton, inputs):
    states, outs = [], []
    for row in inputs:
        st, rs, ro = 0, [], []
        for x in row:
            st = int(a.transitions[st][int(x)])
            rs.append(st)
            ro.append(int(a.outputs[st]))
        states.append(rs)
        outs.append(ro)
    return np.array(states, dtype=np.int64), np.array(outs, dtype=np.int64)


def test_defaults():
    a = generate_automaton(0)
    assert (a.n_states, a.n_inputs, a.n_outputs) == (16, 9, 4)
    assert a.transitions.shape == (16, 9) and a.outputs.shape == (16,)
    assert a.transitions.dtype == np.int64 and a.outputs.dtype == np.int64
    assert a.automaton_id == 0


def test_totality_and_shapes():
    for a, (s, k, o) in _all():
        assert a.transitions.shape == (s, k)
        assert a.outputs.shape == (s,)
        assert (a.n_states, a.n_inputs, a.n_outputs) == (s, k, o)
        assert a.transitions.min() >= 0 and a.transitions.max() < s
        assert a.outputs.min() >= 0 and a.outputs.max() < o


def test_hamiltonian_cycle():
    for a, (s, _, _) in _all():
        assert len(a.cycle) == s and a.cycle[0] == 0
        assert sorted(a.cycle) == list(range(s))
        assert len(a.cycle_inputs) == s
        for i, (st, x) in enumerate(zip(a.cycle, a.cycle_inputs)):
            assert a.transitions[st, x] == a.cycle[(i + 1) % s]
        # Following the recorded inputs from state 0 walks the whole cycle.
        states, _ = a.run(np.array([a.cycle_inputs]))
        assert list(states[0]) == list(a.cycle[1:]) + [0]


def test_all_outputs_used():
    for a, (_, _, o) in _all():
        assert set(a.outputs.tolist()) == set(range(o))


def test_hidden_transition_exists_and_is_hidden():
    for a, _ in _all():
        hidden = a.hidden_transitions()
        assert hidden
        for s, x, t in hidden:
            assert a.transitions[s, x] == t
            assert s != t
            assert a.outputs[s] == a.outputs[t]
        # hidden_transitions is complete: brute-force enumeration agrees.
        brute = [
            (s, x, int(a.transitions[s, x]))
            for s in range(a.n_states)
            for x in range(a.n_inputs)
            if a.transitions[s, x] != s and a.outputs[a.transitions[s, x]] == a.outputs[s]
        ]
        assert sorted(hidden) == sorted(brute)


def test_hidden_transitions_empty_when_none():
    # Hand-built machine with no hidden transition: the method must not invent one.
    a = Automaton(
        automaton_id=0,
        transitions=np.array([[1, 0], [0, 1]]),
        outputs=np.array([0, 1]),
        cycle=(0, 1),
        cycle_inputs=(0, 0),
    )
    assert a.hidden_transitions() == []


def test_deterministic_and_distinct():
    for s, k, o in SIZES:
        a1 = [generate_automaton(i, s, k, o) for i in range(50)]
        a2 = [generate_automaton(i, s, k, o) for i in range(50)]
        assert a1 == a2
        for x, y in zip(a1, a2):
            assert np.array_equal(x.transitions, y.transitions)
            assert np.array_equal(x.outputs, y.outputs)
            assert x.cycle == y.cycle and x.cycle_inputs == y.cycle_inputs
        tables = {x.transitions.tobytes() for x in a1}
        assert len(tables) > 40
        # only (s-1)! distinct cycles exist; expect a good fraction of them
        assert len({x.cycle for x in a1}) >= min(40, math.factorial(s - 1) // 2)


def test_numpy_int_id_same_as_python_int():
    assert generate_automaton(np.int64(7)) == generate_automaton(7)
    assert generate_automaton(10**12).automaton_id == 10**12


def test_generated_arrays_read_only():
    a = generate_automaton(3)
    with pytest.raises(ValueError):
        a.transitions[0, 0] = 1
    with pytest.raises(ValueError):
        a.outputs[0] = 1


def test_run_matches_reference():
    rng = np.random.default_rng(123)
    for a, (_, k, _) in _all(ids=range(0, 300, 7)):
        n, t = int(rng.integers(1, 6)), int(rng.integers(1, 25))
        x = rng.integers(0, k, size=(n, t))
        states, outs = a.run(x)
        ref_s, ref_o = _reference_run(a, x)
        assert states.shape == outs.shape == (n, t)
        assert states.dtype == np.int64 and outs.dtype == np.int64
        np.testing.assert_array_equal(states, ref_s)
        np.testing.assert_array_equal(outs, ref_o)


def test_run_starts_in_state_zero():
    a = generate_automaton(5)
    for x in range(a.n_inputs):
        states, outs = a.run(np.array([[x]]))
        assert states[0, 0] == a.transitions[0, x]
        assert outs[0, 0] == a.outputs[a.transitions[0, x]]


def test_run_rejects_bad_inputs():
    a = generate_automaton(1)
    with pytest.raises(ValueError):
        a.run(np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        a.run(np.array([[0, a.n_inputs]]))
    with pytest.raises(ValueError):
        a.run(np.array([[-1]]))
    with pytest.raises(ValueError):
        a.run(np.array([[0.5]]))


def test_sample_sequences():
    a = generate_automaton(11)
    x, y = sample_sequences(a, 64, 20, np.random.default_rng(0))
    assert x.shape == y.shape == (64, 20)
    assert x.min() >= 0 and x.max() < a.n_inputs
    assert set(np.unique(x).tolist()) == set(range(a.n_inputs))
    np.testing.assert_array_equal(y, _reference_run(a, x)[1])
    x2, y2 = sample_sequences(a, 64, 20, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


def test_dict_round_trip():
    for a, _ in _all(ids=range(0, 300, 13)):
        d = json.loads(json.dumps(a.to_dict()))
        assert d["start_state"] == 0
        assert d["automaton_id"] == a.automaton_id
        assert (d["n_states"], d["n_inputs"], d["n_outputs"]) == (
            a.n_states, a.n_inputs, a.n_outputs
        )
        b = Automaton.from_dict(d)
        assert b == a
        assert np.array_equal(b.transitions, a.transitions)
        assert np.array_equal(b.outputs, a.outputs)
        assert b.cycle == a.cycle and b.cycle_inputs == a.cycle_inputs


def test_from_dict_rejects_inconsistent():
    d = generate_automaton(2).to_dict()
    bad = json.loads(json.dumps(d))
    bad["n_states"] = 17
    with pytest.raises(ValueError):
        Automaton.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["cycle_inputs"][0] = (bad["cycle_inputs"][0] + 1) % 9
    bad["transitions"][0][bad["cycle_inputs"][0]] = 0  # break: no longer on cycle
    with pytest.raises(ValueError):
        Automaton.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["transitions"][3][4] = 16
    with pytest.raises(ValueError):
        Automaton.from_dict(bad)


def test_equality_detects_difference():
    assert generate_automaton(0) != generate_automaton(1)
    assert generate_automaton(0) != generate_automaton(0, n_states=5)


@pytest.mark.parametrize(
    "args",
    [
        dict(automaton_id=-1),
        dict(automaton_id=0, n_states=1),
        dict(automaton_id=0, n_states=4, n_outputs=4),
        dict(automaton_id=0, n_states=4, n_outputs=5),
        dict(automaton_id=0, n_outputs=1),
        dict(automaton_id=0, n_inputs=1),
        dict(automaton_id=1.0),
        dict(automaton_id="1"),
        dict(automaton_id=True),
        dict(automaton_id=0, n_states=16.0),
        dict(automaton_id=0, n_inputs=None),
    ],
)
def test_invalid_arguments(args):
    with pytest.raises(ValueError):
        generate_automaton(**args)


# DS3's 100 tasks are defined by the generator: any change to it (numpy stream,
# order of draws) silently changes every DS3 task, so the default automata are pinned.
DS3_FINGERPRINT = "408822c86d13d4300823b3238812d7b5f73d4b56e8791dcaa3d048b270819dab"


def test_ds3_automata_pinned():
    import hashlib

    h = hashlib.sha256()
    for i in range(100):
        h.update(json.dumps(generate_automaton(i).to_dict(), sort_keys=True).encode())
    assert h.hexdigest() == DS3_FINGERPRINT
    a = generate_automaton(0)
    assert a.outputs.tolist() == [0, 0, 3, 2, 0, 1, 1, 2, 2, 0, 2, 2, 2, 1, 0, 3]
    assert a.cycle == (0, 15, 8, 5, 13, 10, 2, 3, 6, 14, 9, 7, 11, 1, 4, 12)
    assert a.transitions[0].tolist() == [15, 12, 12, 4, 15, 11, 15, 2, 8]


def test_ds3_automata_distinct():
    machines = [generate_automaton(i) for i in range(100)]
    assert len({(m.transitions.tobytes(), m.outputs.tobytes()) for m in machines}) == 100
