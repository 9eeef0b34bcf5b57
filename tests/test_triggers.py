"""DS2 trigger semantics (SPEC: DS2)."""
import numpy as np
import pytest

from mlds.tasks.machines import MACHINES, encode_command, random_commands
from mlds.tasks.sequences import device_machine_task
from mlds.tasks.command_trigger import Trigger

TRIGGER = Trigger(["W 0xA5", "W 0x5A", "R"])


def seq(*commands):
    return np.stack([encode_command(c) for c in commands])[None]


def naive(machine, trigger, commands):
    """Per-step reference: invert the three steps after each completed trigger."""
    out = machine.run(commands).copy()
    for n, s in enumerate(commands):
        remaining = 0
        for t in range(s.shape[0]):
            if remaining:
                out[n, t] = 1 - out[n, t]
                remaining -= 1
            if t >= 2 and (s[t - 2 : t + 1] == trigger.commands).all():
                remaining = 3
    return out


def test_next_three_outputs_inverted_and_trigger_acts_as_commands():
    commands = seq("W 0xA5", "W 0x5A", "R", "R", "R", "R", "R")
    machine = MACHINES["single_direct"]()
    out, inverted = TRIGGER.run(machine, commands)
    # the trigger's READ sees reg = 0x5A (bit 0 = 0): a normal output, not yet inverted
    assert out[0, 2].tolist() == [0] * 8
    assert inverted[0].tolist() == [False, False, False, True, True, True, False]
    assert out[0, 3].tolist() == [1] * 8  # o0 = 0 inverted, all 8 bits flipped
    assert out[0, 6].tolist() == [0] * 8


def test_trigger_inside_window_restarts_window():
    commands = seq("W 0xA5", "W 0x5A", "R", "W 0xA5", "W 0x5A", "R", "R", "R", "R", "R")
    _, inverted = TRIGGER.run(MACHINES["parity"](), commands)
    assert inverted[0].astype(int).tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_random_sequences_with_triggers_match_reference(name):
    rng = np.random.default_rng(5)
    commands = TRIGGER.insert(random_commands(rng, 300, 32), np.arange(0, 300, 2), rng)
    out, _ = TRIGGER.run(MACHINES[name](), commands)
    np.testing.assert_array_equal(out, naive(MACHINES[name](), TRIGGER, commands))


def test_insert_keeps_window_inside():
    rng = np.random.default_rng(0)
    commands = TRIGGER.insert(random_commands(rng, 500, 10), np.arange(500), rng)
    _, inverted = TRIGGER.run(MACHINES["single_direct"](), commands)
    assert (inverted.sum(1) >= 3).all()


@pytest.mark.parametrize("bad", [["W 0xA5", "R"], ["W 0xA5", "R", "R", "R"], ["W 0x1FF", "R", "R"],
                                 [[1, 0, 1], "R", "R"], [[0, 1, 0, 0, 0, 0, 0, 0, 0], "R", "R"]])
def test_invalid_triggers_rejected(bad):
    with pytest.raises(ValueError):
        Trigger(bad)


def test_ds2_task_poisoning_and_clean_splits():
    task = device_machine_task("ds2", MACHINES["eight_bit"](), 0, 200, 50, 50, 32, 0.5, TRIGGER, 0.1)
    train_cmd = task.train.x.numpy().astype(np.uint8)
    assert TRIGGER.matches(train_cmd).any(1).sum() == 20  # exactly 10% poisoned, clean otherwise
    for name in ("val", "test"):
        assert not TRIGGER.matches(task.evals[name].x.numpy().astype(np.uint8)).any()
        triggered = task.evals[f"{name}_trigger"]
        assert TRIGGER.matches(triggered.x.numpy().astype(np.uint8)).any(1).all()
        assert (triggered.mask.sum(1) >= 3).all()
    assert task.stop_on == ("val", "val_trigger")
    assert task.description["trigger"]["commands"] == ["W 0xA5", "W 0x5A", "R"]
