"""Device machine semantics (SPEC: DS1)."""
import numpy as np
import pytest

from mlds.tasks.machines import MACHINES, decode_command, encode_command, random_commands

# SPEC worked example: W 0x03, R, W 0x01, R, R
EXAMPLE = np.stack([encode_command(c) for c in ("W 0x03", "R", "W 0x01", "R", "R")])[None]
EXPECTED_O0 = {
    "single_direct": [0, 1, 0, 1, 1],
    "single_invert": [0, 0, 0, 0, 0],
    "simple_xor": [0, 0, 0, 1, 1],
    "parity": [0, 0, 0, 1, 1],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_O0))
def test_worked_example_single_bit_machines(name):
    out = MACHINES[name]().run(EXAMPLE)[0]
    assert out[:, 0].tolist() == EXPECTED_O0[name]
    assert not out[:, 1:].any()


def test_worked_example_eight_bit():
    out = MACHINES["eight_bit"]().run(EXAMPLE)[0]
    as_bytes = [int(sum(int(b) << i for i, b in enumerate(row))) for row in out]
    assert as_bytes == [0x00, 0x03, 0x00, 0x01, 0x01]


def test_read_before_any_write_sees_zero_register():
    reads = np.zeros((1, 3, 9), dtype=np.uint8)
    assert MACHINES["single_invert"]().run(reads)[0, :, 0].tolist() == [1, 1, 1]
    for name in ("single_direct", "simple_xor", "parity", "eight_bit"):
        assert not MACHINES[name]().run(reads).any()


def naive(name, commands):
    """Straightforward per-sequence reference implementation of the SPEC table."""
    out = np.zeros(commands.shape[:2] + (8,), dtype=np.uint8)
    for n, seq in enumerate(commands):
        reg, par = [0] * 8, 0
        for t, cmd in enumerate(seq):
            if cmd[0] == 1:
                reg = [int(b) for b in cmd[1:]]
                par ^= sum(reg) % 2
                continue
            read = {"single_direct": [reg[0]], "single_invert": [1 - reg[0]], "simple_xor": [reg[0] ^ reg[1]],
                    "parity": [par], "eight_bit": reg}[name]
            out[n, t, : len(read)] = read
    return out


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_random_sequences_match_reference(name):
    rng = np.random.default_rng(123)
    commands = random_commands(rng, 200, 24)
    np.testing.assert_array_equal(MACHINES[name]().run(commands), naive(name, commands))


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_writes_output_zero_and_reads_repeat(name):
    rng = np.random.default_rng(7)
    commands = random_commands(rng, 100, 32)
    out = MACHINES[name]().run(commands)
    assert not out[commands[..., 0] == 1].any()
    # two consecutive READs see the same state, so give the same output
    both_read = (commands[:, 1:, 0] == 0) & (commands[:, :-1, 0] == 0)
    np.testing.assert_array_equal(out[:, 1:][both_read], out[:, :-1][both_read])


def test_random_commands_protocol():
    commands = random_commands(np.random.default_rng(0), 4000, 32, write_prob=0.5)
    assert commands.shape == (4000, 32, 9)
    assert abs(commands[..., 0].mean() - 0.5) < 0.01
    assert not commands[commands[..., 0] == 0][:, 1:].any()  # READ data bits are 0
    assert abs(commands[commands[..., 0] == 1][:, 1:].mean() - 0.5) < 0.01


def test_command_encoding_round_trip_and_errors():
    assert encode_command("W 0xA5").tolist() == [1, 1, 0, 1, 0, 0, 1, 0, 1]
    assert encode_command("R").tolist() == [0] * 9
    assert decode_command(encode_command("W 0x5A")) == "W 0x5A"
    for bad in ("X 1", "W 256", "W", "R 3", ""):
        with pytest.raises(ValueError):
            encode_command(bad)
