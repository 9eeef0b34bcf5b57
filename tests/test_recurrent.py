"""The fast recurrent path (mlds.nets.recurrent, the compiled GRU kernel, the population head, the training
loss) equals plain PyTorch.

Reference: ``nn.GRU`` / ``nn.LSTM`` / ``nn.Linear`` modules (one per network) and
autograd. Outputs agree to 1e-6, gradients to 1e-5; ``gradcheck`` in float64 on
tiny sizes checks the hand-written backward passes exactly. GRU stacks in float32
with a batch that is a multiple of 16 run through the compiled kernel
(:mod:`mlds.nets.cpu_kernel`) where a C compiler is present, the others through
the operator path; both are held to ``nn.GRU`` and to each other.
"""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import GRU_SPEC
from mlds.nets import recurrent
from mlds.nets.registry import build
from mlds.tasks.task import training_loss
from mlds.nets import cpu_kernel, population
from mlds.nets.population import population_mlp, population_mlp_bce
from mlds.nets.registry import population_from_seeds
from mlds.nets.recurrent import recurrent_stack
from reference_recurrent import recurrent_stack_reference
from mlds.tasks.task import score

KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
# (cell, input size, hidden size, layers): the DS1 shape, an LSTM, one layer, input narrower than hidden
SHAPES = [("gru", 9, 8, 4), ("lstm", 9, 16, 3), ("gru", 5, 8, 1), ("lstm", 4, 8, 2)]


def plain_stack(cell, n_in, hidden, n_layers, k, seed=0):
    """k plain nn.GRU/nn.LSTM modules and their weights stacked as ``layers`` (leaf tensors)."""
    torch.manual_seed(seed)
    mods = [getattr(nn, cell.upper())(n_in, hidden, n_layers, batch_first=True) for _ in range(k)]
    layers = [tuple(torch.stack([getattr(m, f"{kind}_l{i}").detach() for m in mods]).requires_grad_()
                    for kind in KINDS) for i in range(n_layers)]
    return mods, layers


def grads(layers):
    return [p.grad.clone() for layer in layers for p in layer]


needs_kernel = pytest.mark.skipif(cpu_kernel._compiler() is None, reason="no C compiler: the kernel cannot be built")


@pytest.mark.parametrize("batch", [4, 16])
@pytest.mark.parametrize("cell,n_in,hidden,n_layers", SHAPES)
def test_matches_plain_modules_outputs_and_gradients(cell, n_in, hidden, n_layers, batch):
    """Batch 4: the operator path; batch 16: GRU stacks through the compiled kernel (where it builds)."""
    k, t_len = 3, 7
    mods, layers = plain_stack(cell, n_in, hidden, n_layers, k)
    x = torch.randn(k, batch, t_len, n_in, requires_grad=True)
    weight = torch.randn(k, batch, t_len, hidden)
    out = recurrent_stack(cell, x, layers)
    assert out.shape == (k, batch, t_len, hidden)
    (out * weight).sum().backward()
    for j, m in enumerate(mods):
        xj = x[j].detach().clone().requires_grad_()
        ref, _ = m(xj)
        torch.testing.assert_close(out[j], ref, atol=1e-6, rtol=0)
        (ref * weight[j]).sum().backward()
        torch.testing.assert_close(x.grad[j], xj.grad, atol=1e-5, rtol=0)
        for i in range(n_layers):
            for kind, p in zip(KINDS, layers[i]):
                torch.testing.assert_close(p.grad[j], getattr(m, f"{kind}_l{i}").grad, atol=1e-5, rtol=0)


@needs_kernel
@pytest.mark.parametrize("n_in,hidden,n_layers,batch", [(9, 8, 4, 32), (5, 8, 1, 16), (4, 16, 3, 48)])
def test_compiled_kernel_equals_operator_path(monkeypatch, n_in, hidden, n_layers, batch):
    """Outputs (with and without gradients) and every gradient, kernel against operators."""
    assert cpu_kernel.library() is not None
    k, t_len = 3, 6
    _, layers = plain_stack("gru", n_in, hidden, n_layers, k, seed=5)
    x = torch.randn(k, batch, t_len, n_in, requires_grad=True)
    weight = torch.randn(k, hidden, t_len, batch)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("MLDS_CPU_KERNEL", flag)
        assert cpu_kernel.usable("gru", batch, x) == (flag == "1")
        for t in (x, *[p for layer in layers for p in layer]):
            t.grad = None
        out = recurrent.recurrent_stack_features("gru", x, layers)
        (out * weight).sum().backward()
        with torch.no_grad():
            plain_out = recurrent.recurrent_stack_features("gru", x, layers)
        results.append((out.detach(), plain_out, x.grad.clone(), grads(layers)))
    (out1, nograd1, dx1, g1), (out0, nograd0, dx0, g0) = results
    torch.testing.assert_close(out1, out0, atol=1e-6, rtol=0)
    torch.testing.assert_close(nograd1, out1, atol=0, rtol=0)
    torch.testing.assert_close(nograd0, out0, atol=1e-6, rtol=0)
    torch.testing.assert_close(dx1, dx0, atol=1e-5, rtol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("shared_input", [False, True])
def test_compiled_training_step_and_forward_equal_the_operator_path(monkeypatch, shared_input):
    """The whole step in the kernel (GRU, head, BCE, both backwards, a network at a time) gives the loss and
    every gradient of the operator path, also under a non-unit incoming gradient; its forward-only mode
    (evaluation) gives the same logits."""
    k, batch = 5, 32
    pop = population_from_seeds(GRU_SPEC, range(k))
    x = (torch.rand(1 if shared_input else k, batch, 7, 9, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    y = (torch.rand(k, batch, 7, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    weight = torch.arange(1.0, k + 1.0)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("MLDS_CPU_KERNEL", flag)
        assert pop._kernel_runs(x, [pop.named()["head.0.weight"]]) == (flag == "1")
        pop.zero_grad(set_to_none=True)
        loss = pop.training_loss(x, y, None, "bce")
        (loss * weight).sum().backward()
        with torch.no_grad():
            logits = pop(x)
        results.append((loss.detach(), [p.grad.clone() for p in pop.parameters()], logits))
    (loss1, grads1, logits1), (loss0, grads0, logits0) = results
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=0)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits1, logits0, atol=1e-5, rtol=0)


def test_without_a_compiler_training_uses_the_operator_path(monkeypatch, tmp_path):
    """No compiler: one warning, the operator path, the same numbers as with the kernel turned off."""
    monkeypatch.setenv("CC", "no-such-compiler-mlds")
    monkeypatch.setattr(cpu_kernel.sysconfig, "get_config_var", lambda name: None)
    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
    monkeypatch.setenv("MLDS_CACHE", str(tmp_path))
    cpu_kernel.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="operator path"):
            assert cpu_kernel.library() is None
        _, layers = plain_stack("gru", 9, 8, 2, 2)
        x = torch.randn(2, 16, 5, 9)
        assert not cpu_kernel.usable("gru", 16, x)
        out = recurrent.recurrent_stack_features("gru", x, layers)
        monkeypatch.setenv("MLDS_CPU_KERNEL", "0")
        torch.testing.assert_close(out, recurrent.recurrent_stack_features("gru", x, layers), atol=0, rtol=0)
        assert not list(tmp_path.iterdir())
    finally:
        cpu_kernel.library.cache_clear()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gradcheck_float64(cell):
    k, batch, t_len, n_in, hidden, n_layers = 2, 2, 3, 3, 2, 2
    torch.manual_seed(1)
    g = 3 if cell == "gru" else 4
    params = []
    for i in range(n_layers):
        width = n_in if i == 0 else hidden
        params += [torch.randn(k, g * hidden, w, dtype=torch.float64) for w in (width, hidden)]
        params += [torch.randn(k, g * hidden, dtype=torch.float64) for _ in range(2)]
    params = [(p * 0.7).requires_grad_() for p in params]
    x = torch.randn(k, batch, t_len, n_in, dtype=torch.float64, requires_grad=True)

    def run(x, *p):
        return recurrent_stack(cell, x, [tuple(p[4 * i : 4 * i + 4]) for i in range(n_layers)])

    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-7)
    shared = torch.randn(1, batch, t_len, n_in, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, (shared, *params), eps=1e-6, atol=1e-7)


def test_gradcheck_head_and_training_loss():
    torch.manual_seed(2)
    k, n = 2, 5
    sizes = [3, 4, 4, 2]
    ws = [torch.randn(k, b, a, dtype=torch.float64, requires_grad=True) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [torch.randn(k, b, dtype=torch.float64, requires_grad=True) for b in sizes[1:]]
    x = torch.randn(k, sizes[0], n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: population_mlp(x, p[:3], p[3:]), (x, *ws, *bs))
    logits = torch.randn(k, 4, 3, 2, dtype=torch.float64, requires_grad=True) * 3
    y = (torch.rand(k, 4, 3, 2) < 0.5).double()
    assert torch.autograd.gradcheck(lambda z: training_loss(z, y, None, "bce"), (logits.detach().requires_grad_(),))
    torch.testing.assert_close(training_loss(logits, y, None, "bce"), score(logits, y, None, "bce")[0])


def test_gradcheck_fused_head_and_loss(monkeypatch):
    """The fused head + BCE, over groups of networks smaller than K (the last one partial)."""
    monkeypatch.setattr(population, "HEAD_CHUNK", 2)
    torch.manual_seed(4)
    k, t_len, batch = 3, 3, 2
    sizes = [3, 4, 4, 2]
    ws = [torch.randn(k, b, a, dtype=torch.float64, requires_grad=True) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [torch.randn(k, b, dtype=torch.float64, requires_grad=True) for b in sizes[1:]]
    x = torch.randn(k, sizes[0], t_len * batch, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(k, sizes[-1], t_len, batch) < 0.5).double()
    assert torch.autograd.gradcheck(lambda x, *p: population_mlp_bce(x, y, p[:3], p[3:]), (x, *ws, *bs))
    unfused = training_loss(population_mlp(x, ws, bs).view(k, -1, t_len, batch), y, None, "bce")
    torch.testing.assert_close(population_mlp_bce(x, y, ws, bs), unfused)


def test_fused_training_loss_equals_forward_then_loss():
    """``PopulationNet.training_loss`` (head and loss fused, K = 6 > one group of 4) gives the loss and
    every gradient of ``training_loss(net(x), y)``, also under a non-unit incoming gradient."""
    pop = population_from_seeds(GRU_SPEC, range(6))
    x = (torch.rand(6, 4, 7, 9, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    y = (torch.rand(6, 4, 7, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    weight = torch.arange(1.0, 7.0)
    results = []
    for compute in (lambda: pop.training_loss(x, y, None, "bce"), lambda: training_loss(pop(x), y, None, "bce")):
        pop.zero_grad(set_to_none=True)
        loss = compute()
        (loss * weight).sum().backward()
        results.append((loss.detach(), [p.grad.clone() for p in pop.parameters()]))
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_networks_are_independent(cell):
    k, batch, t_len, n_in, hidden, n_layers = 3, 4, 6, 5, 8, 3
    _, layers = plain_stack(cell, n_in, hidden, n_layers, k)
    x = torch.randn(k, batch, t_len, n_in)
    weight = torch.randn(k, batch, t_len, hidden)

    def run(x, layers):
        layers = [tuple(p.detach().clone().requires_grad_() for p in layer) for layer in layers]
        xr = x.clone().requires_grad_()
        out = recurrent_stack(cell, xr, layers)
        (out * weight).sum().backward()
        return out.detach(), xr.grad, grads(layers)

    out, dx, dw = run(x, layers)
    x2 = x.clone()
    x2[0] += 1.0
    perturbed = [tuple(p.detach().clone() for p in layer) for layer in layers]
    for layer in perturbed:
        for p in layer:
            p[0] += 0.5
    out2, dx2, dw2 = run(x2, perturbed)
    assert not torch.equal(out[0], out2[0])
    for j in (1, 2):
        assert torch.equal(out[j], out2[j])
        assert torch.equal(dx[j], dx2[j])
        for a, b in zip(dw, dw2):
            assert torch.equal(a[j], b[j])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_shared_input_and_population_of_one(cell):
    k, batch, t_len, n_in, hidden, n_layers = 3, 2, 5, 6, 4, 2
    mods, layers = plain_stack(cell, n_in, hidden, n_layers, k)
    x = torch.randn(1, batch, t_len, n_in, requires_grad=True)
    out = recurrent_stack(cell, x, layers)
    out.sum().backward()
    xe = x.detach().expand(k, -1, -1, -1).clone().requires_grad_()
    ref = recurrent_stack_reference(cell, xe, layers)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    ref.sum().backward()
    torch.testing.assert_close(x.grad, xe.grad.sum(0, keepdim=True), atol=1e-5, rtol=0)
    # a population of one network
    one = [tuple(p.detach()[1:2].clone().requires_grad_() for p in layer) for layer in layers]
    single = recurrent_stack(cell, x.detach(), one)
    torch.testing.assert_close(single[0], mods[1](x[0].detach())[0], atol=1e-6, rtol=0)
    single.sum().backward()
    mods[1].zero_grad()
    mods[1](x[0].detach())[0].sum().backward()
    for i in range(n_layers):
        for kind, p in zip(KINDS, one[i]):
            torch.testing.assert_close(p.grad[0], getattr(mods[1], f"{kind}_l{i}").grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_no_grad_path_and_reused_buffers(cell):
    k, batch, t_len, n_in, hidden, n_layers = 2, 3, 5, 4, 6, 3
    _, layers = plain_stack(cell, n_in, hidden, n_layers, k)
    x1, x2 = torch.randn(k, batch, t_len, n_in), torch.randn(k, batch, t_len, n_in)
    with torch.no_grad():
        ref1, ref2 = (recurrent_stack_reference(cell, x, layers) for x in (x1, x2))
        torch.testing.assert_close(recurrent_stack(cell, x1, layers), ref1, atol=1e-6, rtol=0)
    # poison every pooled work buffer: what a step reads must have been written first
    recurrent.recurrent_stack(cell, x1, layers).sum().backward()
    for buf in recurrent._POOL.values():
        buf.fill_(float("nan"))
    for layer in layers:
        for p in layer:
            p.grad = None
    # two graphs alive at once, then both backwards
    out1, out2 = recurrent_stack(cell, x1, layers), recurrent_stack(cell, x2, layers)
    torch.testing.assert_close(out1, ref1, atol=1e-6, rtol=0)
    torch.testing.assert_close(out2, ref2, atol=1e-6, rtol=0)
    (out1.sum() + 2 * out2.sum()).backward()
    got = grads(layers)
    for layer in layers:
        for p in layer:
            p.grad = None
    ref = recurrent_stack_reference(cell, x1, layers).sum() + 2 * recurrent_stack_reference(cell, x2, layers).sum()
    ref.backward()
    for a, b in zip(got, grads(layers)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_population_net_matches_plain_networks():
    seeds = [3, 5]
    pop = population_from_seeds(GRU_SPEC, seeds)
    x = (torch.rand(2, 4, 9, 9, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    y = (torch.rand(2, 4, 9, 8, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    training_loss(pop(x), y, None, "bce").sum().backward()
    for j in range(len(seeds)):
        plain = build(GRU_SPEC)
        plain.load_state_dict(pop.network_state_dict(j))
        logits = plain(x[j])
        with torch.no_grad():
            torch.testing.assert_close(pop(x[j : j + 1].expand(2, -1, -1, -1))[j], logits, atol=1e-6, rtol=0)
        F.binary_cross_entropy_with_logits(logits, y[j]).backward()
        for name, p in plain.named_parameters():
            torch.testing.assert_close(pop.named()[name].grad[j], p.grad, atol=1e-5, rtol=0)


def test_second_backward_after_buffers_were_reused_is_refused():
    _, layers = plain_stack("gru", 3, 4, 2, 2)
    x = torch.randn(2, 2, 4, 3)
    out = recurrent_stack("gru", x, layers)
    out.sum().backward(retain_graph=True)
    out.sum().backward(retain_graph=True)  # buffers still unused: fine
    recurrent_stack("gru", x, layers).sum()  # a new forward takes the buffers
    with pytest.raises(RuntimeError, match="second backward"):
        out.sum().backward()
