"""DS1 device machines: a command stream in, one 8-bit output per step out.

A command is 9 bits ``[op, d0..d7]``: ``op=1`` is WRITE of the byte ``d``
(``d0`` least significant), ``op=0`` is READ (data bits 0). Every machine
holds an 8-bit register ``reg`` and a parity bit ``par`` (both 0 at the start
of a sequence); a WRITE sets ``reg = d`` and ``par ^= popcount(d) % 2`` and
outputs zeros. The machines differ only in what a READ outputs.
"""
from __future__ import annotations

import numpy as np

N_COMMAND_BITS = 9
N_OUTPUT_BITS = 8


class Machine:
    """Base class: vectorised simulation of one device machine."""

    name: str = ""

    def read_output(self, reg: np.ndarray, par: np.ndarray) -> np.ndarray:
        """Output bits [N, 8] of a READ, given registers [N, 8] and parity [N]."""
        raise NotImplementedError

    def run(self, commands: np.ndarray) -> np.ndarray:
        """Outputs [N, T, 8] (uint8) for commands [N, T, 9] of 0/1 values."""
        commands = np.asarray(commands, dtype=np.uint8)
        if commands.ndim != 3 or commands.shape[-1] != N_COMMAND_BITS:
            raise ValueError(f"commands must be [N, T, {N_COMMAND_BITS}], got {commands.shape}")
        n, t_len, _ = commands.shape
        reg = np.zeros((n, N_OUTPUT_BITS), dtype=np.uint8)
        par = np.zeros(n, dtype=np.uint8)
        out = np.zeros((n, t_len, N_OUTPUT_BITS), dtype=np.uint8)
        for t in range(t_len):
            write = commands[:, t, 0] == 1
            data = commands[:, t, 1:]
            reg = np.where(write[:, None], data, reg)
            par = np.where(write, par ^ (data.sum(axis=1) % 2).astype(np.uint8), par)
            out[:, t] = np.where(write[:, None], 0, self.read_output(reg, par))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _bit0_only(bit: np.ndarray) -> np.ndarray:
    out = np.zeros((bit.shape[0], N_OUTPUT_BITS), dtype=np.uint8)
    out[:, 0] = bit
    return out


class SingleDirectMachine(Machine):
    """READ outputs ``o0 = reg bit 0``."""

    name = "single_direct"

    def read_output(self, reg, par):
        return _bit0_only(reg[:, 0])


class SingleInvertMachine(Machine):
    """READ outputs ``o0 = 1 - reg bit 0``."""

    name = "single_invert"

    def read_output(self, reg, par):
        return _bit0_only(1 - reg[:, 0])


class SimpleXORMachine(Machine):
    """READ outputs ``o0 = reg bit 0 XOR reg bit 1``."""

    name = "simple_xor"

    def read_output(self, reg, par):
        return _bit0_only(reg[:, 0] ^ reg[:, 1])


class EightBitMachine(Machine):
    """READ outputs the whole register, ``o0..o7 = reg``."""

    name = "eight_bit"

    def read_output(self, reg, par):
        return reg.copy()


class ParityMachine(Machine):
    """READ outputs ``o0 = par``, the parity of all bits written so far."""

    name = "parity"

    def read_output(self, reg, par):
        return _bit0_only(par)


MACHINES: dict[str, type[Machine]] = {
    cls.name: cls
    for cls in (SingleDirectMachine, SingleInvertMachine, SimpleXORMachine, EightBitMachine, ParityMachine)
}


def encode_command(text: str) -> np.ndarray:
    """``"W 0xA5"`` or ``"R"`` (also ``"WRITE 165"``, ``"READ"``) -> 9 bits."""
    parts = str(text).split()
    op = parts[0].upper() if parts else ""
    bits = np.zeros(N_COMMAND_BITS, dtype=np.uint8)
    if op in ("R", "READ") and len(parts) == 1:
        return bits
    if op in ("W", "WRITE") and len(parts) == 2:
        value = int(parts[1], 0)
        if not 0 <= value <= 255:
            raise ValueError(f"WRITE value must be a byte, got {value} in {text!r}")
        bits[0] = 1
        bits[1:] = [(value >> i) & 1 for i in range(8)]
        return bits
    raise ValueError(f"not a command: {text!r} (expected 'R' or 'W <byte>', e.g. 'W 0xA5')")


def decode_command(bits) -> str:
    """Inverse of :func:`encode_command`."""
    bits = [int(b) for b in bits]
    if bits[0] == 0:
        return "R"
    return f"W 0x{sum(b << i for i, b in enumerate(bits[1:])):02X}"


def random_commands(rng: np.random.Generator, n: int, seq_len: int, write_prob: float = 0.5) -> np.ndarray:
    """Random command sequences [n, seq_len, 9]: WRITE w.p. ``write_prob``, data uniform."""
    op = (rng.random((n, seq_len)) < write_prob).astype(np.uint8)
    data = rng.integers(0, 2, size=(n, seq_len, 8), dtype=np.uint8) * op[..., None]
    return np.concatenate([op[..., None], data], axis=-1)
