"""Reference for the tests: the wavefront of :mod:`mlds.nets.recurrent` with plain autograd
through every time step (slower; supports higher-order gradients)."""
import torch
from torch import Tensor

from mlds.nets.recurrent import Layer, _check, _span


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor) -> Tensor:
    """``x [K or 1, B, T, I]`` (1: shared by all networks) -> ``[K, B, T, G*H]``."""
    k = w_ih.shape[0]
    b, t, i = x.shape[-3:]
    flat = x.reshape(x.shape[0], b * t, i)
    if flat.shape[0] == 1 and k > 1:
        out = torch.matmul(flat, w_ih.transpose(1, 2)) + b_ih.unsqueeze(1)
    else:
        out = torch.baddbmm(b_ih.unsqueeze(1), flat, w_ih.transpose(1, 2))
    return out.view(k, b, t, -1)


def _bmm(bias: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """Per-layer-per-network ``h @ w^T + bias`` for stacked ``[L', K, ...]`` operands."""
    lk = h.shape[0] * h.shape[1]
    out = torch.baddbmm(bias.reshape(lk, 1, -1), h.reshape(lk, h.shape[2], h.shape[3]),
                        w.reshape(lk, w.shape[2], w.shape[3]).transpose(1, 2))
    return out.view(h.shape[0], h.shape[1], h.shape[2], -1)


def recurrent_stack_reference(cell: str, x: Tensor, layers: list[Layer]) -> Tensor:
    """:func:`recurrent_stack` with plain autograd through every time step (slower;
    supports higher-order gradients)."""
    _check(cell, x, layers)
    n_layers = len(layers)
    k, gh_width, hidden = layers[0][1].shape
    batch, t_len = x.shape[-3], x.shape[-2]
    gi0 = input_projection(x, layers[0][0], layers[0][2])
    w_hh = torch.stack([layer[1] for layer in layers])
    b_hh = torch.stack([layer[3] for layer in layers])
    if n_layers > 1:
        w_ih = torch.stack([layer[0] for layer in layers[1:]])
        b_ih = torch.stack([layer[2] for layer in layers[1:]])
    h = x.new_zeros(n_layers, k, batch, hidden)
    c = x.new_zeros(n_layers, k, batch, hidden) if cell == "lstm" else None
    outputs = []
    for s in range(t_len + n_layers - 1):
        lo, hi = _span(s, t_len, n_layers)
        h_cur = h[lo : hi + 1]
        gh = _bmm(b_hh[lo : hi + 1], h_cur, w_hh[lo : hi + 1])
        parts = []
        if lo == 0:
            parts.append(gi0[:, :, s].unsqueeze(0))
        if hi >= 1:
            first = max(lo, 1)
            parts.append(_bmm(b_ih[first - 1 : hi], h[first - 1 : hi], w_ih[first - 1 : hi]))
        gi = parts[0] if len(parts) == 1 else torch.cat(parts)
        if cell == "gru":
            rz = torch.sigmoid(gi[..., : 2 * hidden] + gh[..., : 2 * hidden])
            r, z = rz[..., :hidden], rz[..., hidden:]
            n = torch.tanh(gi[..., 2 * hidden :] + r * gh[..., 2 * hidden :])
            h_new = n + z * (h_cur - n)
        else:
            gates = gi + gh
            ifo = torch.sigmoid(gates[..., : 2 * hidden])
            g = torch.tanh(gates[..., 2 * hidden : 3 * hidden])
            o = torch.sigmoid(gates[..., 3 * hidden :])
            c_new = ifo[..., hidden:] * c[lo : hi + 1] + ifo[..., :hidden] * g
            h_new = o * torch.tanh(c_new)
            c = _splice(c, c_new, lo, hi)
        h = _splice(h, h_new, lo, hi)
        if hi == n_layers - 1:
            outputs.append(h_new[-1])
    return torch.stack(outputs, dim=2)


def _splice(full: Tensor, part: Tensor, lo: int, hi: int) -> Tensor:
    """``full`` with layers ``lo..hi`` replaced by ``part`` (no in-place writes, for autograd)."""
    if lo == 0 and hi == full.shape[0] - 1:
        return part
    return torch.cat([full[:lo], part, full[hi + 1 :]])
