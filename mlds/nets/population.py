"""Populations: K independent networks of one architecture as one batched model.

Parameters are the plain network's state dict with a leading network
dimension, so network ``k`` of the population is exactly
``{name: p[k] for name, p in population}`` under standard ``torch.nn``
state-dict names and loads into the plain module of its kind
(:mod:`mlds.nets.registry`). :class:`PopulationNet` holds what every kind
shares (stacking, unstacking, dropping networks); a kind adds ``forward``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.autograd.function import once_differentiable

from mlds.nets import cpu_kernel
from mlds.nets.recurrent import _give, _reclaim, _take, pack_stack, recurrent_stack_features
from mlds.tasks.task import bce_terms, training_loss

# Networks per pass of the fused head + loss on a CPU: one pass's activations (about 0.5 MiB per DS1
# network) then stay in a core's L2 cache; 4 measured fastest here (2 MiB L2; 1, 2, 8, 16, 64 slower).
HEAD_CHUNK = 4


def _with_bias(weights: Sequence[Tensor], biases: Sequence[Tensor]) -> list[Tensor]:
    """Each linear layer as one matrix ``[K, F_out, F_in + 1]``: weight, then bias as the last column."""
    return [torch.cat([w, b.unsqueeze(2)], 2) for w, b in zip(weights, biases)]


def _scaled_head_gradients(d_mats: Sequence[Tensor], scale: Tensor) -> list[Tensor]:
    """Per-network gradients of the head's ``[K, F_out, F_in + 1]`` matrices, times ``scale [K, 1, 1]``
    (the loss's incoming gradient), as the weights' gradients followed by the biases'."""
    return [d[..., :-1] * scale for d in d_mats] + [d[..., -1] * scale[..., 0] for d in d_mats]


def _augmented(tag: str, k: int, features: int, n: int, like: Tensor, pooled: bool) -> Tensor:
    """``[K, features + 1, N]`` activation buffer whose last row is ones (the bias input)."""
    buf = _take(tag, (k, features + 1, n), like) if pooled else like.new_empty(k, features + 1, n)
    buf[:, features] = 1.0
    return buf


def _mlp_forward(x: Tensor, mats: list[Tensor], pooled: bool) -> tuple[Tensor, list[Tensor]]:
    k, _, n = x.shape
    act = _augmented("head0", k, x.shape[1], n, x, pooled)
    act[:, :-1] = x
    acts = [act]
    for i, m in enumerate(mats[:-1]):
        nxt = _augmented(f"head{i + 1}", k, m.shape[1], n, x, pooled)
        torch.bmm(m, act, out=nxt[:, :-1]).relu_()
        acts.append(act := nxt)
    return torch.bmm(mats[-1], act), acts


class _HeadFunction(torch.autograd.Function):
    """The MLP head of K networks, feature-major: ``x [K, F0, N] -> [K, O, N]``, linear layers
    with ReLU between, with a hand-written backward.

    Each layer is one batched matmul on its input with a row of ones appended
    (so the bias is a column of the weight matrix and its gradient comes out of
    the weight gradient's matmul); ReLU runs in place and the activation buffers
    are reused from step to step.
    """

    @staticmethod
    def forward(ctx, x: Tensor, *params: Tensor) -> Tensor:
        n_linear = len(params) // 2
        mats = _with_bias(params[:n_linear], params[n_linear:])
        out, ctx.acts = _mlp_forward(x, mats, pooled=True)
        ctx.mats = mats
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        acts, mats = ctx.acts, ctx.mats
        spent = {f"head{i}": a for i, a in enumerate(acts)}
        _reclaim(spent, getattr(ctx, "returned", False))
        grad = grad.contiguous()
        n_linear = len(mats)
        d_w, d_b = [None] * n_linear, [None] * n_linear
        d_x = None
        for i in range(n_linear - 1, -1, -1):
            d_m = torch.bmm(grad, acts[i].transpose(1, 2))  # [K, F_out, F_in + 1]: weight | bias
            d_w[i], d_b[i] = d_m[..., :-1], d_m[..., -1]
            w_t = mats[i][..., :-1].transpose(1, 2)
            if i == 0:
                if ctx.needs_input_grad[0]:
                    d_x = torch.bmm(w_t, grad)
                break
            d_in = _take(f"dhead{i}", (grad.shape[0], w_t.shape[1], grad.shape[2]), grad)
            torch.bmm(w_t, grad, out=d_in)
            torch.ops.aten.threshold_backward.grad_input(d_in, acts[i][:, :-1], 0.0, grad_input=d_in)  # ReLU
            spent[f"dhead{i}"] = grad = d_in
        _give(spent)
        ctx.returned = True
        return (d_x, *d_w, *d_b)


def population_mlp(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """``x [K, F0, N]`` through K MLPs (``weights[i] [K, F_out, F_in]``, ``biases[i] [K, F_out]``,
    ReLU between layers) -> ``[K, O, N]``."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *biases)):
        return _HeadFunction.apply(x, *weights, *biases)
    with torch.no_grad():
        mats = _with_bias(weights, biases)
        return _mlp_forward(x, mats, pooled=False)[0]


class _HeadBCEFunction(torch.autograd.Function):
    """The MLP head of K networks and their per-network mean BCE, ``x [K, F0, N], y [K, O, T, B]
    -> [K]`` (``N = T * B``), with the gradient computed in the forward.

    The networks go through in passes of ``chunk``: forward through the head,
    the loss and its gradient ``(sigmoid(logits) - y) / n``, and back through
    the head, while the pass's activations are still in cache. The backward only
    scales the kept gradients by the loss's incoming gradient (exact for the
    usual ``loss.sum()``). Same numbers as :func:`population_mlp` followed by
    :func:`mlds.tasks.task.training_loss`, up to the order of the loss's sum.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, chunk: int, *params: Tensor) -> Tensor:
        k, _, n = x.shape
        n_linear = len(params) // 2
        mats = _with_bias(params[:n_linear], params[n_linear:])
        n_out = mats[-1].shape[1]
        d_mats = [torch.empty_like(m) for m in mats]
        d_x, loss = torch.empty_like(x), x.new_empty(k)
        c = min(chunk, k)
        acts = [_augmented(f"fused{i}", c, m.shape[2] - 1, n, x, pooled=True) for i, m in enumerate(mats)]
        grads = [_take(f"dfused{i}", (c, m.shape[1], n), x) for i, m in enumerate(mats)]
        for k0 in range(0, k, c):
            part = slice(k0, min(k0 + c, k))
            m = part.stop - k0
            a, g = [t[:m] for t in acts], [t[:m] for t in grads]
            a[0][:, :-1] = x[part]
            for i in range(n_linear - 1):
                torch.bmm(mats[i][part], a[i], out=a[i + 1][:, :-1]).relu_()
            logits = torch.bmm(mats[-1][part], a[-1], out=g[-1])
            target = y[part].reshape(m, n_out, n)
            loss[part] = bce_terms(logits, target).view(m, -1).mean(1)
            grad = torch.sigmoid(logits).sub_(target).mul_(1.0 / (n_out * n))
            for i in range(n_linear - 1, -1, -1):
                torch.bmm(grad, a[i].transpose(1, 2), out=d_mats[i][part])  # weight | bias
                w_t = mats[i][part, :, :-1].transpose(1, 2)
                if i == 0:
                    torch.bmm(w_t, grad, out=d_x[part])
                    break
                grad = torch.bmm(w_t, grad, out=g[i - 1])
                torch.ops.aten.threshold_backward.grad_input(grad, a[i][:, :-1], 0.0, grad_input=grad)  # ReLU
        _give({**{f"fused{i}": t for i, t in enumerate(acts)}, **{f"dfused{i}": t for i, t in enumerate(grads)}})
        ctx.save_for_backward(d_x, *d_mats)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        d_x, *d_mats = ctx.saved_tensors
        scale = grad.view(-1, 1, 1)
        return (d_x * scale, None, None, *_scaled_head_gradients(d_mats, scale))


def population_mlp_bce(x: Tensor, y: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor]) -> Tensor:
    """Per-network mean BCE ``[K]`` of :func:`population_mlp` ``(x [K, F0, T * B])`` against targets
    ``y [K, O, T, B]`` (feature-major, like the head's output), for training: fused into one
    pass over cache-sized groups of networks on a CPU, all networks at once on a GPU."""
    chunk = x.shape[0] if x.is_cuda else HEAD_CHUNK
    return _HeadBCEFunction.apply(x, y, chunk, *weights, *biases)


class _GRUStepFunction(torch.autograd.Function):
    """A whole training step of K GRU + MLP networks with a per-network mean BCE in the compiled
    kernel (:func:`mlds.nets.cpu_kernel.gru_mlp_bce_step`), one network at a time so that its
    activations never leave the cache: ``(x, y, wp, *head weights, *head biases) -> loss [K]``.
    As in :class:`_HeadBCEFunction`, the gradients come out of the forward and the backward only
    scales them by the loss's incoming gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, wp: Tensor, *params: Tensor) -> Tensor:
        n_linear = len(params) // 2
        mats = _with_bias(params[:n_linear], params[n_linear:])
        loss, dwp, d_mats = cpu_kernel.gru_mlp_bce_step(x.contiguous(), y.contiguous(), wp.contiguous(), mats)
        ctx.save_for_backward(dwp, *[d.view(m.shape) for d, m in zip(d_mats, mats)])
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        dwp, *d_mats = ctx.saved_tensors
        scale = grad.view(-1, 1, 1)
        return (None, None, dwp * scale.unsqueeze(0), *_scaled_head_gradients(d_mats, scale))


class PopulationNet(nn.Module):
    """K networks of one architecture; ``forward(x [K or 1, B, ...]) -> [K, B, ...]`` (1: the same
    input for every network). Subclasses implement ``forward`` from :meth:`named` parameters."""

    def __init__(self, spec: dict, state_dicts: Sequence[dict[str, Tensor]]):
        super().__init__()
        if not state_dicts:
            raise ValueError("a population needs at least one network")
        self.spec = dict(spec)
        self.names = list(state_dicts[0])
        self.params = nn.ParameterList(
            [nn.Parameter(torch.stack([sd[name] for sd in state_dicts])) for name in self.names])

    @property
    def size(self) -> int:
        return self.params[0].shape[0]

    def named(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.params))

    def training_loss(self, x: Tensor, y: Tensor, mask: Tensor | None, loss: str) -> Tensor:
        """Per-network training loss ``[K]`` of inputs ``x`` against targets ``y``
        (:func:`mlds.tasks.task.training_loss` of ``self(x)``); a kind may fuse it."""
        return training_loss(self(x), y, mask, loss)

    def network_state_dict(self, k: int) -> dict[str, Tensor]:
        """Network ``k`` as a plain state dict (CPU copies)."""
        return {name: p[k].detach().cpu().clone() for name, p in self.named().items()}

    @torch.no_grad()
    def keep(self, index: Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep only networks ``index`` (in that order), here and in ``optimizer``'s
        state, so that the kept networks continue exactly as before."""
        old = list(self.params)
        new = [nn.Parameter(p.detach()[index].clone()) for p in old]
        if optimizer is not None:
            replace = {id(o): n for o, n in zip(old, new)}
            for group in optimizer.param_groups:
                group["params"] = [replace.get(id(p), p) for p in group["params"]]
            for o, n in zip(old, new):
                state = optimizer.state.pop(o, None)
                if state is not None:
                    optimizer.state[n] = {key: (v[index].clone() if torch.is_tensor(v) and v.dim() > 0 else v)
                                          for key, v in state.items()}
        self.params = nn.ParameterList(new)


class PopulationRecurrentNet(PopulationNet):
    """K recurrent networks (``kind: recurrent``); ``forward(x [K or 1, B, T, I]) -> logits [K, B, T, O]``."""

    def _parts(self) -> tuple[list[tuple[Tensor, ...]], list[Tensor], list[Tensor]]:
        """The recurrent layers' ``(w_ih, w_hh, b_ih, b_hh)`` and the head's weights and biases."""
        p = self.named()
        layers = [tuple(p[f"rnn.{kind}_l{i}"] for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                  for i in range(self.spec["num_layers"])]
        n_linear = len(self.spec["head_sizes"]) + 1
        return layers, [p[f"head.{2 * i}.weight"] for i in range(n_linear)], [p[f"head.{2 * i}.bias"] for i in range(n_linear)]

    def _kernel_runs(self, x: Tensor, weights: list[Tensor]) -> bool:
        """Whether the compiled kernel takes these networks and this input (:func:`cpu_kernel.usable`)."""
        return cpu_kernel.usable(self.spec["cell"], x.shape[1], weights[0]) and len(weights) <= cpu_kernel.MAX_HEAD

    def forward(self, x: Tensor) -> Tensor:
        layers, weights, biases = self._parts()
        cell = self.spec["cell"]
        if not torch.is_grad_enabled() and self._kernel_runs(x, weights):  # e.g. evaluation
            x, wp = pack_stack(cell, x, layers)
            return cpu_kernel.gru_mlp_forward(x.contiguous(), wp, _with_bias(weights, biases))
        h = recurrent_stack_features(cell, x, layers)
        k, _, t, b = h.shape
        # The head works feature-major, [K, features, T * B]: one batched matmul per layer.
        out = population_mlp(h.view(k, h.shape[1], t * b), weights, biases)
        return out.view(k, -1, t, b).permute(0, 3, 2, 1).contiguous()  # [K, B, T, O]

    def training_loss(self, x: Tensor, y: Tensor, mask: Tensor | None, loss: str) -> Tensor:
        """Unmasked BCE with per-step targets ``y [K, B, T, O]``: the whole step in the compiled kernel
        where it runs (GRU on a CPU, :mod:`mlds.nets.cpu_kernel`), else the head and the loss fused
        (:func:`population_mlp_bce`); anything else as :meth:`PopulationNet.training_loss`."""
        per_step = (self.size, *x.shape[1:3], self.spec["output_size"])
        if loss != "bce" or mask is not None or tuple(y.shape) != per_step or not torch.is_grad_enabled():
            return super().training_loss(x, y, mask, loss)
        layers, weights, biases = self._parts()
        cell = self.spec["cell"]
        if self._kernel_runs(x, weights):
            x, wp = pack_stack(cell, x, layers)
            return _GRUStepFunction.apply(x, y.to(wp.dtype).contiguous(), wp, *weights, *biases)
        h = recurrent_stack_features(cell, x, layers)
        k, _, t, b = h.shape
        return population_mlp_bce(h.view(k, h.shape[1], t * b), y.permute(0, 3, 2, 1), weights, biases)


class PopulationConvNet(PopulationNet):
    """K convolutional networks (``kind: conv``); ``forward(x [K or 1, B, C, H, W]) -> logits [K, B, classes]``.

    The K networks' convolutions run as one grouped convolution (``groups=K``, network ``k``'s
    channels side by side), in channels-last memory layout, which measured fastest on a CPU
    (``scripts/bench_conv.py``); an input shared by all networks (``x [1, ...]``) goes through
    the first layer as one ordinary convolution with ``K * channels`` filters.
    """

    memory_format = torch.channels_last  # of the activations; scripts/bench_conv.py compares the default layout

    def forward(self, x: Tensor) -> Tensor:
        p = self.named()
        k, spec = self.size, self.spec
        stride, pad = spec["stride"], spec["kernel_size"] // 2
        b, c, height, width = x.shape[1:]
        if x.shape[0] == 1:
            w = p["features.0.weight"]
            h = F.conv2d(x[0].contiguous(memory_format=self.memory_format), w.reshape(-1, *w.shape[2:]),
                         p["features.0.bias"].reshape(-1), stride, pad)
        else:
            h = x.transpose(0, 1).reshape(b, k * c, height, width).contiguous(memory_format=self.memory_format)
            w = p["features.0.weight"]
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), p["features.0.bias"].reshape(-1), stride, pad, groups=k)
        h = F.relu(h)
        for i in range(1, spec["num_layers"]):
            w = p[f"features.{2 * i}.weight"]
            h = F.relu(F.conv2d(h, w.reshape(-1, *w.shape[2:]), p[f"features.{2 * i}.bias"].reshape(-1), stride, pad,
                                groups=k))
        pooled = h.mean((2, 3)).view(b, k, -1).transpose(0, 1)  # [K, B, channels]
        return torch.baddbmm(p["head.bias"].unsqueeze(1), pooled, p["head.weight"].transpose(1, 2))
