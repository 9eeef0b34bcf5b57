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

from mlds.nets.recurrent import _give, _reclaim, _take, recurrent_stack_features


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
        mats = [torch.cat([w, b.unsqueeze(2)], 2) for w, b in zip(params[:n_linear], params[n_linear:])]
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
        mats = [torch.cat([w, b.unsqueeze(2)], 2) for w, b in zip(weights, biases)]
        return _mlp_forward(x, mats, pooled=False)[0]


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

    def forward(self, x: Tensor) -> Tensor:
        p = self.named()
        n_layers = self.spec["num_layers"]
        layers = [tuple(p[f"rnn.{kind}_l{i}"] for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                  for i in range(n_layers)]
        h = recurrent_stack_features(self.spec["cell"], x, layers)  # [K, H, T, B]
        k, _, t, b = h.shape
        # The head works feature-major, [K, features, T * B]: one batched matmul per layer.
        n_linear = len(self.spec["head_sizes"]) + 1
        out = population_mlp(h.view(k, h.shape[1], t * b), [p[f"head.{2 * i}.weight"] for i in range(n_linear)],
                             [p[f"head.{2 * i}.bias"] for i in range(n_linear)])
        return out.view(k, -1, t, b).permute(0, 3, 2, 1).contiguous()  # [K, B, T, O]


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
