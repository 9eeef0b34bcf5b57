"""Population engine: a network trains the same alone and inside a population."""
import dataclasses
from functools import partial

import lightning as L
import pytest
import torch

from conftest import GRU_SPEC
from mlds.nets.registry import build, param_count
from mlds.train.engine import PopulationModule, batch_order
from mlds.tasks.machines import MACHINES
from mlds.nets.registry import population_from_seeds
from mlds.tasks.sequences import device_machine_task
from mlds.tasks.task import NetworkData, score


@pytest.fixture(scope="module")
def task():
    return device_machine_task("ds1", MACHINES["simple_xor"](), 0, 128, 64, 64, 16, 0.5)


class RecordingModule(PopulationModule):
    """Remembers the batch order every network was given in every epoch."""

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.orders = getattr(self, "orders", {})
        for row, i in zip(self._order, self.active):
            self.orders[(self.seeds[i], self.current_epoch)] = row.clone()
        self.lrs = getattr(self, "lrs", []) + [self.optimizers().param_groups[0]["lr"]]


def fit(task, seeds, max_steps=None, max_epochs=100, stop_loss=1e-9, scheduler=None):
    net = population_from_seeds(GRU_SPEC, seeds)
    module = RecordingModule(net, task, seeds, partial(torch.optim.Adam, lr=3e-3), 32, stop_loss, scheduler=scheduler)
    trainer = L.Trainer(max_steps=max_steps or -1, max_epochs=max_epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    trainer.fit(module)
    return module


def test_param_count_ds1():
    assert param_count(build(GRU_SPEC)) == 4364
    assert population_from_seeds(GRU_SPEC, [0, 1, 2]).params[0].shape[0] == 3


@pytest.mark.parametrize("kernel", ["1", "0"])
def test_alone_and_in_population_identical_start_batches_and_trajectory(task, monkeypatch, kernel):
    """Through the compiled CPU kernel (where it builds) and through the operator path (what CUDA runs)."""
    monkeypatch.setenv("MLDS_CPU_KERNEL", kernel)
    alone = fit(task, [7], max_steps=20)
    crowd = fit(task, [3, 7, 11, 12], max_steps=20)
    start_alone = population_from_seeds(GRU_SPEC, [7]).network_state_dict(0)
    start_crowd = population_from_seeds(GRU_SPEC, [3, 7, 11, 12]).network_state_dict(1)
    for name in start_alone:
        assert torch.equal(start_alone[name], start_crowd[name])
    epochs = [e for (s, e) in alone.orders if s == 7]
    assert len(epochs) == 5  # 20 steps of 4 batches per epoch
    for e in epochs:
        assert torch.equal(alone.orders[(7, e)], crowd.orders[(7, e)])
        assert torch.equal(alone.orders[(7, e)], batch_order(7, e, 128))
    assert not torch.equal(crowd.orders[(3, 0)], crowd.orders[(7, 0)])
    a, c = alone.records[0].state_dict, crowd.records[1].state_dict
    assert alone.trainer.global_step == crowd.trainer.global_step == 20
    moved = max((a[n] - start_alone[n]).abs().max().item() for n in a)
    assert moved > 1e-3  # it really trained
    assert max((a[n] - c[n]).abs().max().item() for n in a) < 1e-5


def test_compiled_kernel_and_operator_path_train_the_same_networks(task, monkeypatch):
    trained = {}
    for kernel in ("1", "0"):
        monkeypatch.setenv("MLDS_CPU_KERNEL", kernel)
        trained[kernel] = fit(task, [3, 7], max_steps=20).records
    for with_kernel, with_operators in zip(trained["1"], trained["0"]):
        a, b = with_kernel.state_dict, with_operators.state_dict
        assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5
        assert with_kernel.history["val_loss"] == pytest.approx(with_operators.history["val_loss"], abs=1e-6)


def test_learning_rate_schedule_steps_per_epoch_alone_and_in_population(task):
    schedule = partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5)
    alone = fit(task, [7], max_epochs=3, scheduler=schedule)
    crowd = fit(task, [3, 7], max_epochs=3, scheduler=schedule)
    assert alone.lrs == pytest.approx([3e-3, 1.5e-3, 7.5e-4]) and crowd.lrs == alone.lrs
    plain = fit(task, [7], max_epochs=3)
    assert plain.lrs == pytest.approx([3e-3] * 3)
    a, c, p = alone.records[0].state_dict, crowd.records[1].state_dict, plain.records[0].state_dict
    assert max((a[n] - c[n]).abs().max().item() for n in a) < 1e-5
    assert max((a[n] - p[n]).abs().max().item() for n in a) > 1e-4  # the schedule changed the trajectory


def test_dropping_networks_does_not_change_the_others(task):
    seeds = [1, 2, 3]
    x, y = task.train.x[:32], task.train.y[:32]

    def steps(net, opt, n):
        for _ in range(n):
            loss, _ = score(net(x.unsqueeze(0)), y, None, "bce")
            opt.zero_grad()
            loss.sum().backward()
            opt.step()

    full = population_from_seeds(GRU_SPEC, seeds)
    opt_full = torch.optim.Adam(full.parameters(), lr=1e-2)
    steps(full, opt_full, 5)
    full.keep(torch.tensor([0, 2]), opt_full)
    steps(full, opt_full, 5)
    pair = population_from_seeds(GRU_SPEC, [1, 3])
    opt_pair = torch.optim.Adam(pair.parameters(), lr=1e-2)
    steps(pair, opt_pair, 10)
    for k in range(2):
        a, b = full.network_state_dict(k), pair.network_state_dict(k)
        assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-5


def test_stopped_network_keeps_its_weights(task):
    one_epoch = fit(task, [4, 5], max_epochs=1)
    stopped = fit(task, [4, 5], max_epochs=5, stop_loss=100.0)  # everyone converges after epoch 1
    for r1, r2 in zip(one_epoch.records, stopped.records):
        assert r2.converged and r2.epochs == 1 and len(r2.history["val_loss"]) == 1
        assert not r1.converged
        for name in r1.state_dict:
            assert torch.equal(r1.state_dict[name], r2.state_dict[name])


class SeedFlippedLabels(NetworkData):
    """Each network's own data: networks with an odd seed see every bit of the targets of rows
    ``rows % 3 == 0`` flipped (a stand-in for DS4's per-network trigger and poisoned subset)."""

    def __init__(self, seeds):
        self.odd = torch.tensor([s % 2 == 1 for s in seeds])
        self.kept = [list(seeds)]

    def apply(self, split, x, y, rows):
        flip = self.odd.view(-1, 1) & (rows % 3 == 0)  # [K, B]
        y = y.expand(len(self.odd), *y.shape[1:])
        return x, torch.where(flip.view(*flip.shape, *[1] * (y.dim() - 2)), 1 - y, y), None

    def keep(self, index):
        self.odd = self.odd[index]
        self.kept.append(index.tolist())

    def to(self, device):
        self.odd = self.odd.to(device)
        return self


def test_each_network_sees_its_own_data_alone_and_in_a_population(task):
    """Task.network_data: a per-network view of the gathered batch (no K copies of the data); a
    network trains the same alone and in a population, and its view is used for stopping too."""
    own = dataclasses.replace(task, network_data=SeedFlippedLabels)
    alone = fit(own, [5], max_epochs=2)
    crowd = fit(own, [2, 5, 8], max_epochs=2)
    shared = fit(task, [5], max_epochs=2)
    a, c, s = alone.records[0].state_dict, crowd.records[1].state_dict, shared.records[0].state_dict
    assert max((a[n] - c[n]).abs().max().item() for n in a) < 1e-5
    assert max((a[n] - s[n]).abs().max().item() for n in a) > 1e-4  # the view changed what it learnt
    assert alone.records[0].history["val_loss"] == pytest.approx(crowd.records[1].history["val_loss"], abs=1e-5)
    assert shared.records[0].history["val_loss"] != pytest.approx(alone.records[0].history["val_loss"], abs=1e-3)
    # networks with an even seed see the shared data
    even = fit(task, [2], max_epochs=2).records[0].state_dict
    assert max((even[n] - crowd.records[0].state_dict[n]).abs().max().item() for n in even) < 1e-5


class RetireSecondAfterFirstEpoch(PopulationModule):
    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        if self.current_epoch == 0:
            self.retire([1])


def test_retired_networks_take_their_data_view_with_them(task):
    """When a network stops, its per-network data leaves with it, in step with the parameters:
    the networks after it keep their own views (odd seed 3 keeps its flipped labels)."""
    own = dataclasses.replace(task, network_data=SeedFlippedLabels)
    module = RetireSecondAfterFirstEpoch(population_from_seeds(GRU_SPEC, [1, 2, 3]), own, [1, 2, 3],
                                         partial(torch.optim.Adam, lr=3e-3), 32, 1e-9)
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0).fit(module)
    assert module.data.kept == [[1, 2, 3], [0, 2]] and [r.epochs for r in module.records] == [2, 1, 2]
    for seed, position, epochs in ((3, 2, 2), (2, 1, 1)):
        alone = fit(own, [seed], max_epochs=epochs).records[0].state_dict
        got = module.records[position].state_dict
        assert max((alone[n] - got[n]).abs().max().item() for n in alone) < 1e-5, seed
