"""The population engine: a LightningModule that trains K networks of one task at once.

Each network has its own initial weights and batch order (from its seed),
its own view of the data where the task gives one (``Task.network_data``: DS4's
per-network trigger, applied to each gathered batch), its own Adam state (Adam is element-wise, so one Adam over the stacked
parameters is K independent ones) and its own stopping point: after each
epoch, every network whose validation losses are all below ``stop_loss`` is
retired with its weights and dropped from the batch, so it no longer changes.

Performance (the numbers are the same as the plain formulas, up to float
rounding): the training step computes only the loss (no accuracy), BCE from
fast element-wise operators with a hand-written gradient, and Adam in its
multi-tensor form; evaluation runs in chunks of 64 sequences on a CPU (256 on a
GPU). See ``scripts/bench.py`` for the measurement.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from mlds.nets.population import PopulationNet
from mlds.nets.recurrent import clear_buffers
from mlds.tasks.task import NetworkData, Split, Task, score


def batch_order(seed: int, epoch: int, n: int) -> Tensor:
    """The order in which network ``seed`` visits the ``n`` training sequences in ``epoch``."""
    state = np.random.SeedSequence([int(seed), int(epoch), 0x0BA7C4]).generate_state(2, dtype=np.uint64)
    gen = torch.Generator().manual_seed(int(state[0] & np.uint64(2**63 - 1)))
    return torch.randperm(n, generator=gen)


@dataclass
class NetworkRecord:
    """What training produced for one network."""

    seed: int
    state_dict: dict[str, Tensor] | None = None
    epochs: int = 0
    converged: bool = False
    history: dict[str, list[float]] = field(default_factory=dict)
    snapshots: dict[int, dict[str, Tensor]] = field(default_factory=dict)  # epoch -> weights after it


class PopulationModule(L.LightningModule):
    """Trains the population ``net`` (network ``k`` has seed ``seeds[k]``) on ``task``."""

    def __init__(self, net: PopulationNet, task: Task, seeds: list[int], optimizer: partial,
                 batch_size: int, stop_loss: float, eval_batch: int | None = None, scheduler: partial | None = None,
                 snapshots: Sequence[int] = ()):
        super().__init__()
        if net.size != len(seeds):
            raise ValueError(f"population of {net.size} networks for {len(seeds)} seeds")
        self.automatic_optimization = False
        self.net = net
        self.task = task
        self.seeds = [int(s) for s in seeds]
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler  # a torch.optim.lr_scheduler partial, stepped once per epoch
        self.batch_size = int(batch_size)
        self.stop_loss = float(stop_loss)
        self.eval_batch = None if eval_batch is None else int(eval_batch)
        self.active = list(range(len(self.seeds)))  # positions in seeds of the networks still training
        self.records = [NetworkRecord(s) for s in self.seeds]
        self.snapshot_epochs = {int(e) for e in snapshots}  # weights kept after these epochs (0: the start)
        # each network's own view of the data (None: all networks see the task's data as it is)
        self.data: NetworkData | None = task.network_data(self.seeds) if task.network_data else None

    # ---- Lightning hooks -------------------------------------------------------------------
    def configure_optimizers(self):
        factory = self.optimizer_factory
        if getattr(factory, "func", None) in (torch.optim.Adam, torch.optim.AdamW) \
                and "foreach" not in (getattr(factory, "keywords", None) or {}):
            # the multi-tensor implementation: the same numbers, fewer operator calls
            optimizer = factory(self.net.parameters(), foreach=True)
        else:
            optimizer = factory(self.net.parameters())
        if self.scheduler_factory is None:
            return optimizer
        # the schedule depends on the epoch only, so every network follows it alone or in a population
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}

    def setup(self, stage: str) -> None:
        self.task = self.task.to(self.device)
        if self.data is not None:
            self.data = self.data.to(self.device)

    def on_fit_start(self) -> None:
        if 0 in self.snapshot_epochs and self.current_epoch == 0:
            self.snapshot(0)

    def train_dataloader(self) -> DataLoader:
        n_batches = -(-len(self.task.train) // self.batch_size)
        return DataLoader(range(n_batches), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([0], batch_size=None)

    def on_train_epoch_start(self) -> None:
        n = len(self.task.train)
        order = torch.stack([batch_order(self.seeds[i], self.current_epoch, n) for i in self.active])
        self._order = order.to(self.device)
        self._epoch_loss = torch.zeros(len(self.active), device=self.device)
        self._epoch_batches = 0

    def training_step(self, step: int, batch_idx: int) -> None:
        idx = self._order[:, step * self.batch_size : (step + 1) * self.batch_size]
        train = self.task.train
        x, y = train.x[idx], train.y[idx]
        if self.data is not None:
            x, y, _ = self.data.apply("train", x, y, idx)
        loss = self.net.training_loss(x, y, None if train.mask is None else train.mask[idx], self.task.loss)
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss.sum())
        opt.step()
        self._epoch_loss += loss.detach()
        self._epoch_batches += 1

    def validation_step(self, batch, batch_idx: int) -> None:
        self._val = {name: self.evaluate(name) for name in self.task.stop_on}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        train_loss = (self._epoch_loss / max(self._epoch_batches, 1)).tolist()
        val = {name: (loss.tolist(), acc.tolist()) for name, (loss, acc) in self._val.items()}
        stopped = []
        for j, i in enumerate(self.active):
            record = self.records[i]
            record.epochs = self.current_epoch + 1
            record.history.setdefault("train_loss", []).append(train_loss[j])
            for name, (loss, acc) in val.items():
                record.history.setdefault(f"{name}_loss", []).append(loss[j])
                record.history.setdefault(f"{name}_acc", []).append(acc[j])
            if all(loss[j] < self.stop_loss for loss, _ in val.values()):
                record.converged = True
                stopped.append(j)
        if self.current_epoch + 1 in self.snapshot_epochs:
            self.snapshot(self.current_epoch + 1)
        self.log("active", float(len(self.active)), prog_bar=True)
        self.log("val_loss_median", float(np.median(val[self.task.stop_on[0]][0])), prog_bar=True)
        if stopped:
            self.retire(stopped)
        if not self.active:
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()  # manual optimization: Lightning leaves the stepping to us
        if scheduler is not None:
            scheduler.step()

    def on_train_end(self) -> None:
        self.retire(list(range(len(self.active))))
        clear_buffers()

    # ---- population bookkeeping ------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self, epoch: int) -> None:
        """Keep the weights of every active network as they are after ``epoch`` epochs: one copy of
        the stacked parameters to the host, once per snapshot epoch (no sync inside an epoch)."""
        stacked = {name: p.detach().to("cpu", copy=True) for name, p in self.net.named().items()}
        for j, i in enumerate(self.active):
            self.records[i].snapshots[epoch] = {name: t[j] for name, t in stacked.items()}

    def retire(self, positions: list[int]) -> None:
        """Store the weights of the active networks at ``positions`` and drop them from training."""
        for j in positions:
            self.records[self.active[j]].state_dict = self.net.network_state_dict(j)
        keep = [j for j in range(len(self.active)) if j not in set(positions)]
        self.active = [self.active[j] for j in keep]
        if keep:
            index = torch.tensor(keep, device=self.device)
            self.net.keep(index, self.optimizers().optimizer if self._trainer is not None else None)
            if self.data is not None:
                self.data.keep(index)
            if hasattr(self, "_order"):
                self._order = self._order[index]
                self._epoch_loss = self._epoch_loss[index]

    @torch.no_grad()
    def evaluate(self, name: str) -> tuple[Tensor, Tensor]:
        """Per-network (loss, accuracy) of the networks still training on evaluation split ``name``."""
        return evaluate(self.net, self.task.evals[name], self.task.loss, self.eval_batch,
                        None if self.data is None else partial(self.data.apply, name))


@torch.no_grad()
def evaluate(net: PopulationNet, split: Split, loss: str, eval_batch: int | None = None,
             view=None) -> tuple[Tensor, Tensor]:
    """Per-network (loss, accuracy) ``([K], [K])`` on ``split``, in chunks of ``eval_batch`` samples
    (default: 256 on a GPU; 64 on a CPU, where smaller chunks stay in cache and run faster).
    ``view(x, y, rows)``: each network's own version of a chunk and the rows it is scored on
    (:meth:`NetworkData.apply`)."""
    if eval_batch is None:
        eval_batch = 256 if next(net.parameters()).device.type == "cuda" else 64
    total_loss = total_acc = 0.0
    weight_total = 0.0
    for start in range(0, len(split), eval_batch):
        sl = slice(start, start + eval_batch)
        mask = None if split.mask is None else split.mask[sl]
        x, y = split.x[sl].unsqueeze(0), split.y[sl]
        if view is not None:
            rows = torch.arange(start, start + x.shape[1], device=x.device).unsqueeze(0)
            x, y, own = view(x, y.unsqueeze(0), rows)
            mask = own if mask is None or own is None else mask & own
        logits = net(x)
        l, a = score(logits, y, mask, loss)
        w = (float(split.x[sl].shape[0]) if mask is None
             else mask.to(logits.dtype).expand(logits.shape[:-1]).sum(tuple(range(1, logits.dim() - 1))))
        total_loss, total_acc, weight_total = total_loss + l * w, total_acc + a * w, weight_total + w
    weight_total = torch.as_tensor(weight_total).clamp(min=1.0)
    return total_loss / weight_total, total_acc / weight_total
