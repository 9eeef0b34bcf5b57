"""Batched recurrent stacks for populations: K independent GRU/LSTM networks.

``nn.GRU``/``nn.LSTM`` cannot be batched over networks, so the recurrences are
written here with plain tensor operators (the same code runs on CPU and CUDA)
and follow PyTorch's equations exactly (GRU gates r, z, n; LSTM i, f, g, o).

Fast path (:func:`recurrent_stack`). With small layers the cost of a step is
the number of operator calls and the memory they touch, not arithmetic, so:

- All layers advance together as a *wavefront*: at step ``s`` layer ``l``
  processes time ``s - l``, so one step is one batched matmul for every layer
  of every network (``T + L - 1`` steps instead of ``L * T``).
- Each layer's input, recurrent and bias weights are packed into one matrix
  acting on ``[input | h | 1]`` (GRU gate rows ``r, z, n_input, n_hidden``;
  LSTM ``i, f, o, g``): one step is one ``bmm`` plus a few in-place gate
  operators on contiguous row blocks (feature-major layout), ``tanh`` taken as
  ``2 * sigmoid(2a) - 1`` (PyTorch's CPU ``tanh`` is several times slower).
- A custom autograd Function holds the whole stack: no autograd graph per
  step. The forward saves the gate activations; the backward runs through
  time by hand as a reverse wavefront (one batched matmul per step for the
  input gradients, one for the weight gradients).
- The large work buffers are reused from one training step to the next
  instead of being allocated afresh (:func:`clear_buffers` frees them).

Networks stay independent: every matmul is batched over networks and every
other operator is element-wise, so network k's outputs and gradients depend
only on network k's weights and inputs.

``tests/reference_recurrent.py`` holds the plain autograd version of the same
wavefront; tests use it and ``nn.GRU``/``nn.LSTM`` as references.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from mlds.nets import cpu_kernel

GATES = {"gru": 3, "lstm": 4}

Layer = tuple[Tensor, Tensor, Tensor, Tensor]


def _check(cell: str, x: Tensor, layers: list[Layer]) -> None:
    if cell not in GATES:
        raise ValueError(f"unknown recurrent cell {cell!r}")
    if not layers:
        raise ValueError("a recurrent stack needs at least one layer")
    if x.dim() != 4:
        raise ValueError(f"x must be [K or 1, B, T, I], got shape {tuple(x.shape)}")
    k = layers[0][1].shape[0]
    if x.shape[0] not in (1, k):
        raise ValueError(f"x has {x.shape[0]} networks, the layers {k}")


# ---- packing: per-layer nn.GRU/nn.LSTM weights -> one matrix per layer on [input | h | 1] ------
def _pack(cell: str, layers: list[Layer], width_in: int) -> Tensor:
    """``wp [L, K, 4H, width_in + H + 1]`` (autograd-tracked, so the gradients of the
    packed matrix flow back to the per-layer parameters).

    Column block ``:width_in`` multiplies the layer's input (zero-padded to
    ``width_in``), block ``width_in:width_in + H`` its previous hidden state, the
    last column a constant 1 (the biases). Gate rows: GRU ``r, z`` (input +
    hidden), ``n_input``, ``n_hidden`` (kept apart because ``n = tanh(n_input + r *
    n_hidden)``); LSTM ``i, f, o, g``. The rows that feed a ``tanh`` are scaled
    by 2, so that ``tanh(a) = 2 * sigmoid(2a) - 1`` takes one fast ``sigmoid``.
    """
    hidden = layers[0][1].shape[-1]
    mats = []
    for w_ih, w_hh, b_ih, b_hh in layers:
        w_in = F.pad(w_ih, (0, width_in - w_ih.shape[-1]))  # [K, G*H, width_in]
        if cell == "gru":
            k = w_hh.shape[0]
            w_in = F.pad(w_in, (0, 0, 0, hidden))  # the n_hidden rows take no input
            zeros = w_hh.new_zeros(k, hidden, hidden)
            w_h = torch.cat([w_hh[:, : 2 * hidden], zeros, w_hh[:, 2 * hidden :]], 1)
            bias = torch.cat([b_ih[:, : 2 * hidden] + b_hh[:, : 2 * hidden], b_ih[:, 2 * hidden :],
                              b_hh[:, 2 * hidden :]], 1)
        else:  # gate order i, f, g, o -> i, f, o, g (no index tensor: nothing to copy to a GPU)
            def order(t: Tensor) -> Tensor:
                return torch.cat([t[:, : 2 * hidden], t[:, 3 * hidden :], t[:, 2 * hidden : 3 * hidden]], 1)

            w_in, w_h, bias = order(w_in), order(w_hh), order(b_ih + b_hh)
        mats.append(torch.cat([w_in, w_h, bias.unsqueeze(-1)], 2))
    wp = torch.stack(mats)
    scale = wp.new_ones(4 * hidden, 1)
    scale[(2 if cell == "gru" else 3) * hidden :] = 2.0
    return wp * scale


def _span(s: int, t_len: int, n_layers: int) -> tuple[int, int]:
    """Layers ``lo..hi`` active at wavefront step ``s``."""
    return max(0, s - t_len + 1), min(n_layers - 1, s)


# Work buffers of the last backward, reused by the next forward of the same shape: large fresh
# allocations cost page faults, which are a noticeable share of a training step on a CPU.
_POOL: dict[str, Tensor] = {}


def _take(tag: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised work buffer: the pooled one of ``tag`` if it fits, else a new one."""
    buf = _POOL.pop(tag, None)
    if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
        buf = like.new_empty(shape)
    return buf


def clear_buffers() -> None:
    """Free the work buffers kept for the next training step (e.g. after training)."""
    _POOL.clear()


def _give(buffers: dict[str, Tensor]) -> None:
    """Return work buffers to the pool (their user is done with them)."""
    _POOL.update(buffers)


def _reclaim(buffers: dict[str, Tensor], returned: bool) -> None:
    """Take a graph's buffers back for its backward. After a first backward has returned
    them (``returned``), a second one (``retain_graph``) works only while no forward has
    taken them since."""
    for tag, buf in buffers.items():
        if _POOL.get(tag) is buf:
            del _POOL[tag]
        elif returned:
            raise RuntimeError("a second backward through a population recurrent stack or head after another "
                               "forward reused its buffers; run the forward again instead of retain_graph=True")


def _forward(cell: str, x: Tensor, wp: Tensor, save: bool):
    """The wavefront forward; returns ``(out [K, H, T, B], saved)``.

    Layout is feature-major (``[..., features, batch]``) so that every gate block
    is a contiguous run of rows. ``hc[s, l]`` holds layer ``l``'s input at step
    ``s``: ``[below (width_in) | own h (H) | 1]``; ``acts[s]`` the gate
    activations. With ``save`` every step is kept for the backward, otherwise a
    two-step ring (except under the compiled kernel, which always writes every
    step). Every entry a step reads is written first or set here, so buffers
    reused from an earlier step need no clearing.
    """
    n_layers, k, gw, width = wp.shape
    hidden = gw // 4
    wb = width - hidden - 1
    _, batch, t_len, n_in = x.shape
    n_steps = t_len + n_layers - 1
    lk = n_layers * k
    lstm = cell == "lstm"
    h2, h3, hh = 2 * hidden, 3 * hidden, wb + hidden
    kernel = cpu_kernel.usable(cell, batch, wp)
    if save or kernel:
        slots = n_steps + 1
        hc = _take("hc", (slots, n_layers, k, width, batch), x)
        acts = _take("acts", (n_steps, lk, gw, batch), x)
        hc[:t_len, 0, :, :n_in] = x.permute(2, 0, 3, 1)  # [T, K or 1, I, B]
    else:
        slots = 2
        hc = x.new_empty(slots, n_layers, k, width, batch)
        acts = x.new_empty(1, lk, gw, batch)
        out = x.new_empty(t_len, k, hidden, batch)
    # the entries no step writes
    hc[:, :, :, -1] = 1.0  # the bias input
    hc[:, 0, :, n_in:wb] = 0.0  # padding of the input columns
    hc[:, 1:, :, hidden:wb] = 0.0
    for layer in range(n_layers):  # zero initial state
        hc[layer % slots, layer, :, wb:hh] = 0.0
    hcf = hc.view(slots, lk, width, batch)
    if lstm:
        if save:
            cs = _take("cs", (slots, lk, hidden, batch), x)
            tcs = _take("tcs", (n_steps, lk, hidden, batch), x)
        else:
            cs, tcs = x.new_empty(slots, lk, hidden, batch), x.new_empty(1, lk, hidden, batch)
        for layer in range(n_layers):
            cs[layer % slots, layer * k : (layer + 1) * k] = 0.0
    if kernel:
        cpu_kernel.gru_forward(wp, hc, acts, wb, t_len)  # the same loop compiled (mlds/nets/gru_kernel.c)
    else:
        wpf = wp.reshape(lk, gw, width)
        for s in range(n_steps):
            lo, hi = _span(s, t_len, n_layers)
            nl = hi - lo + 1
            cur, nxt, a_s = (s, s + 1, s) if save else (s % 2, (s + 1) % 2, 0)
            if not save and lo == 0:
                hc[cur, 0, :, :n_in] = x[:, :, s].transpose(1, 2)
            rows = slice(lo * k, (hi + 1) * k)
            a = torch.bmm(wpf[rows], hcf[cur, rows], out=acts[a_s, rows])  # [L'K, 4H, B]
            h_out = hc[nxt, lo : hi + 1, :, wb:hh]
            if lstm:
                a.sigmoid_()
                g = a[:, h3:].mul_(2).sub_(1)
                c_new = cs[nxt, rows]
                torch.mul(a[:, hidden:h2], cs[cur, rows], out=c_new)
                c_new.addcmul_(a[:, :hidden], g)
                tc = torch.tanh(c_new, out=tcs[a_s, rows])
                torch.mul(a[:, h2:h3].view(nl, k, hidden, batch), tc.view(nl, k, hidden, batch), out=h_out)
            else:
                a[:, :h2].sigmoid_()
                n = a[:, h2:h3].addcmul_(a[:, :hidden], a[:, h3:]).sigmoid_().mul_(2).sub_(1)
                torch.lerp(n.view(nl, k, hidden, batch), hc[cur, lo : hi + 1, :, wb:hh],
                           a[:, hidden:h2].view(nl, k, hidden, batch), out=h_out)
            top = min(hi, n_layers - 2)
            if top >= lo:  # the next layer reads this output at the next step
                hc[nxt, lo + 1 : top + 2, :, :hidden] = h_out[: top - lo + 1]
            if not save and hi == n_layers - 1:
                out[s - n_layers + 1] = h_out[-1]
    if save or kernel:
        out = hc[n_layers : n_layers + t_len, n_layers - 1, :, wb:hh]
    out = out.permute(1, 2, 0, 3).contiguous()  # [T, K, H, B] -> [K, H, T, B]
    buffers = {"acts": acts, "hc": hc, **({"cs": cs, "tcs": tcs} if lstm else {})}
    if save:
        return out, buffers
    if kernel:
        _give(buffers)
    return out, {}


def _backward(cell: str, grad_out: Tensor, x_shape, wp: Tensor, saved: dict, need_x: bool):
    """Backward through time of :func:`_forward` (``save=True``): ``(dx, dwp)``.

    A reverse wavefront: at step ``s`` every active layer's hidden-state gradient
    is complete (from the output, its own next time step and the layer above,
    all handled at step ``s + 1``), so one batched matmul per step carries it
    back to the layer inputs. The packed-weight gradient accumulates one batched
    matmul per step.
    """
    n_layers, k, gw, width = wp.shape
    hidden = gw // 4
    wb = width - hidden - 1
    kx, batch, t_len, n_in = x_shape
    n_steps = t_len + n_layers - 1
    lk = n_layers * k
    lstm = cell == "lstm"
    hc, acts = saved["hc"], saved["acts"]
    if cpu_kernel.usable(cell, batch, wp, hc, acts, grad_out):  # the same loop compiled (mlds/nets/gru_kernel.c)
        dwp = grad_out.new_empty(wp.shape)
        dx = grad_out.new_empty(t_len, k, n_in, batch) if need_x else None
        cpu_kernel.gru_backward(wp, hc, acts, grad_out, dwp, dx, wb, n_in)
        _give(saved)
        return _input_gradient(dx, kx, k), dwp
    hcf = hc.view(n_steps + 1, lk, width, batch)
    if lstm:
        cs, tcs = saved["cs"], saved["tcs"]
        dc = grad_out.new_zeros(lk, hidden, batch)
    dh = grad_out.new_zeros(lk, hidden, batch)  # gradient of each layer's current h
    dwp = grad_out.new_zeros(lk, gw, width)
    gbuf = _take("g", (lk, gw, batch), grad_out)  # gate pre-activation gradients of one step
    dbuf = _take("dinp", (lk, width, batch), grad_out)  # layer input gradients of one step
    dx = grad_out.new_empty(t_len, k, n_in, batch) if need_x else None
    go = grad_out.permute(2, 0, 1, 3)  # [K, H, T, B] -> [T, K, H, B]
    wpt = wp.reshape(lk, gw, width).transpose(1, 2).contiguous()  # [LK, W, 4H]
    one, half = grad_out.new_ones(()), grad_out.new_full((), 0.5)
    h2, h3, hh = 2 * hidden, 3 * hidden, wb + hidden
    for s in range(n_steps - 1, -1, -1):
        lo, hi = _span(s, t_len, n_layers)
        rows = slice(lo * k, (hi + 1) * k)
        if hi == n_layers - 1:
            dh[-k:] += go[s - n_layers + 1]
        d = dh[rows]
        a = acts[s, rows]
        g = gbuf[rows]
        if lstm:
            tc = tcs[s, rows]
            dcs = dc[rows]
            dcs.add_(torch.addcmul(one, tc, tc, value=-1).mul_(a[:, h2:h3]).mul_(d))
            gg = a[:, h3:]
            torch.mul(dcs, gg, out=g[:, :hidden])
            torch.mul(dcs, cs[s, rows], out=g[:, hidden:h2])
            torch.mul(d, tc, out=g[:, h2:h3])
            torch.mul(dcs, a[:, :hidden], out=g[:, h3:])
            ifo = a[:, :h3]
            g[:, :h3].mul_(torch.addcmul(ifo, ifo, ifo, value=-1))
            g[:, h3:].mul_(torch.addcmul(half, gg, gg, value=-0.5))
            dcs.mul_(a[:, hidden:h2])
        else:
            r, z, n, uh = a[:, :hidden], a[:, hidden:h2], a[:, h2:h3], a[:, h3:]
            du = g[:, h2:h3]
            torch.mul(torch.addcmul(d, d, z, value=-1), torch.addcmul(half, n, n, value=-0.5), out=du)
            torch.mul(du, r, out=g[:, h3:])
            torch.mul(du, uh, out=g[:, :hidden])
            torch.mul(d, hcf[s, rows, wb:hh] - n, out=g[:, hidden:h2])
            rz = a[:, :h2]
            g[:, :h2].mul_(torch.addcmul(rz, rz, rz, value=-1))
        inp = hcf[s, rows]
        dwp[rows].baddbmm_(g, inp.transpose(1, 2))
        dinp = torch.bmm(wpt[rows], g, out=dbuf[rows])  # [L'K, W, B]
        if lstm:
            d.copy_(dinp[:, wb:hh])
        else:
            torch.addcmul(dinp[:, wb:hh], d, z, out=d)
        first = max(lo, 1)
        if first <= hi:  # layer l's input gradient goes to layer l - 1's output
            dh[(first - 1) * k : hi * k] += dinp[(first - lo) * k :, :hidden]
        if lo == 0 and dx is not None:
            dx[s] = dinp[:k, :n_in]
    _give({"g": gbuf, "dinp": dbuf})
    _give(saved)
    return _input_gradient(dx, kx, k), dwp.view(n_layers, k, gw, width)


def _input_gradient(dx: Tensor | None, kx: int, k: int) -> Tensor | None:
    """``dx [T, K, I, B]`` as the gradient of ``x [K or 1, B, T, I]``."""
    if dx is None:
        return None
    dx = dx.permute(1, 3, 0, 2)  # [K, B, T, I]
    if kx == 1 and k > 1:
        dx = dx.sum(0, keepdim=True)
    return dx.contiguous()


class _StackFunction(torch.autograd.Function):
    """The whole recurrent stack as one autograd node with a hand-written backward."""

    @staticmethod
    def forward(ctx, cell: str, x: Tensor, wp: Tensor) -> Tensor:
        out, saved = _forward(cell, x, wp, save=True)
        ctx.cell = cell
        ctx.x_shape = tuple(x.shape)
        ctx.wp = wp
        ctx.saved = saved
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        _reclaim(ctx.saved, getattr(ctx, "returned", False))
        dx, dwp = _backward(ctx.cell, grad_out.contiguous(), ctx.x_shape, ctx.wp, ctx.saved,
                            need_x=ctx.needs_input_grad[1])
        ctx.returned = True  # _backward gave the buffers back to the pool
        return None, dx, dwp


def pack_stack(cell: str, x: Tensor, layers: list[Layer]) -> tuple[Tensor, Tensor]:
    """``x`` in the weights' dtype and the packed weights ``wp [L, K, 4H, W]`` (autograd-tracked)
    of a stack, checked; ``W - H - 1`` input columns per layer."""
    _check(cell, x, layers)
    hidden = layers[0][1].shape[-1]
    width_in = max([x.shape[-1]] + [hidden] * (len(layers) > 1))
    return x.to(layers[0][1].dtype), _pack(cell, layers, width_in)


def recurrent_stack_features(cell: str, x: Tensor, layers: list[Layer]) -> Tensor:
    """:func:`recurrent_stack` with the output feature-major, ``[K, H, T, B]`` (the layout
    the computation uses inside; what a batched head on ``[K, H, T * B]`` wants)."""
    x, wp = pack_stack(cell, x, layers)
    if not (torch.is_grad_enabled() and (x.requires_grad or wp.requires_grad)):
        with torch.no_grad():
            return _forward(cell, x, wp, save=False)[0]
    return _StackFunction.apply(cell, x, wp)


def recurrent_stack(cell: str, x: Tensor, layers: list[Layer]) -> Tensor:
    """Run a stack of ``cell`` layers over ``x [K or 1, B, T, I]`` (1: the same input for
    every network); returns the last layer's hidden states ``[K, B, T, H]``.
    ``layers[l] = (w_ih, w_hh, b_ih, b_hh)`` with a leading population dimension K,
    each shaped like ``nn.GRU``/``nn.LSTM``'s. Initial states are zero."""
    return recurrent_stack_features(cell, x, layers).permute(0, 3, 2, 1)
