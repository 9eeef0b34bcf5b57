"""Reading zoos and release packages: WebDataset streams, a PyTorch dataset of weight vectors, ready modules.

Three ways in, all of them safe on downloaded data (``safetensors`` + JSON only;
nothing is ever unpickled, so loading a zoo cannot run code):

- Stock WebDataset::

      import webdataset as wds
      from mlds.zoo.reader import shard_paths, decode
      for net in wds.WebDataset(shard_paths("MLDS-DS1-100"), shardshuffle=False).map(decode):
          net.key, net.weights, net.meta

  (:func:`webdataset` builds the same pipeline.)
- :class:`ZooDataset`: a map-style ``torch.utils.data.Dataset`` of
  ``(flattened weight vector, label, metadata)`` with filters, read by random
  access from an index of the shards.
- :func:`to_module`: one sample -> a plain ``nn.Module`` with its weights loaded.

Vector layout (fixed): the parameters in the order of the plain module's
``state_dict()`` (registration order: ``rnn.weight_ih_l0, rnn.weight_hh_l0,
rnn.bias_ih_l0, rnn.bias_hh_l0, ..., head.0.weight, head.0.bias, ...``), each
flattened row-major, as float32. :func:`weight_layout` lists the slices,
:func:`flatten` / :func:`unflatten` convert.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from torch import Tensor, nn
from torch.utils.data import Dataset

from mlds.nets.registry import build
from mlds.zoo.splits import check_split, split_of
from mlds.zoo.store import (CorruptShardError, Entry, Network, ZooStore, build_catalog, contained_path,
                        decode as _decode_sample, read_entry, scan_shard, walk_shard)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- sources

def is_package(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def shard_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard files of a source: a release package folder (its manifest's shards, in order; only
    relative paths inside the package, else ``ValueError``), a zoo root (every finished shard; links
    inside it are not followed), a single ``.tar``, or a list of these."""
    if isinstance(source, (list, tuple)):
        return [p for s in source for p in shard_paths(s)]
    path = Path(source)
    if path.is_file():
        return [str(path)]
    if is_package(path):
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            listed = [s["path"] for s in manifest["shards"]]
        except (ValueError, RecursionError, KeyError, TypeError) as err:
            raise ValueError(f"{path / MANIFEST} is not a valid manifest ({type(err).__name__}: "
                             f"{str(err)[:200]}); check it with scripts/package.py verify") from None
        return [str(contained_path(path, rel)) for rel in listed]
    if path.is_dir():
        return [str(p) for p in ZooStore(path).shards()]
    raise FileNotFoundError(f"no zoo, package or shard at {path}")


def decode(sample: dict) -> Network:
    """A raw WebDataset sample -> :class:`~mlds.zoo.store.Network` (weights checked against their SHA-256).

    A defect raises :class:`~mlds.zoo.store.CorruptShardError` naming the shard and the byte offset."""
    try:
        return _decode_sample(sample)
    except CorruptShardError as err:
        raise _located(err, sample.get("__key__")) from None


def _located(err: CorruptShardError, key: str | None) -> CorruptShardError:
    """``err`` with the byte offset of ``key`` in its shard when the stream did not know it."""
    if err.offset >= 0 or not key or not os.path.isfile(err.path):
        return err
    try:
        for found, members in walk_shard(err.path):
            if found == key:
                return CorruptShardError(err.path, min(o for o, _ in members.values()), err.reason)
    except CorruptShardError as structural:
        return structural
    return err


def raise_located(exn: Exception) -> bool:
    """WebDataset ``handler``: re-raise a read error as :class:`CorruptShardError` with file and offset.

    Python's tar reader only says "unexpected end of data"; this walks the
    shard named in the error to find where it is damaged."""
    text = " ".join(str(a) for a in getattr(exn, "args", ()))
    for word in text.replace("'", " ").replace('"', " ").split():
        if word.endswith(".tar") and os.path.isfile(word):
            try:
                for _ in walk_shard(word):
                    pass
            except CorruptShardError as err:
                raise err from exn
            raise CorruptShardError(word, -1, f"{type(exn).__name__}: {exn}") from exn
    raise exn


def webdataset(source, check: bool = True, skip_corrupt: bool = False, **kwargs) -> wds.WebDataset:
    """Stock ``wds.WebDataset`` over a zoo or package, in order, yielding checked :class:`Network` s.

    ``check`` first walks every shard's tar headers (cheap): Python's tar reader
    takes a shard cut at a member boundary, or with a damaged header, for a
    shorter valid one. A corrupt shard raises :class:`CorruptShardError`, or
    with ``skip_corrupt`` is left out (the others stay readable)."""
    paths = shard_paths(source)
    if check:
        sound = []
        for path in paths:
            try:
                for _ in walk_shard(path):
                    pass
            except CorruptShardError as err:
                if not skip_corrupt:
                    raise
                log.warning("skipping corrupt shard: %s", err)
                continue
            sound.append(path)
        paths = sound
    kwargs.setdefault("shardshuffle", False)
    kwargs.setdefault("empty_check", False)
    kwargs.setdefault("handler", raise_located)
    return wds.WebDataset(paths, **kwargs).map(decode)


# --------------------------------------------------------------------------- vectors and modules

@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int


def weight_layout(architecture: dict) -> list[Slot]:
    """The fixed vector layout of an architecture (``meta['architecture']``)."""
    slots, start = [], 0
    with torch.device("meta"):  # shapes only: nothing allocated, whatever sizes the architecture names
        state = build(architecture).state_dict()
    for name, tensor in state.items():
        stop = start + tensor.numel()
        slots.append(Slot(name, tuple(tensor.shape), start, stop))
        start = stop
    return slots


def flatten(weights: dict[str, Tensor], layout: list[Slot]) -> Tensor:
    """State dict -> float32 vector in ``layout`` order (names and shapes must match exactly)."""
    names = {s.name for s in layout}
    if set(weights) != names:
        raise ValueError(f"weights do not match the layout: missing {sorted(names - set(weights))}, "
                         f"unexpected {sorted(set(weights) - names)}")
    parts = []
    for slot in layout:
        tensor = weights[slot.name]
        if tuple(tensor.shape) != slot.shape:
            raise ValueError(f"{slot.name} has shape {tuple(tensor.shape)}, the layout says {slot.shape}")
        parts.append(tensor.reshape(-1).to(torch.float32))
    return torch.cat(parts)


def unflatten(vector: Tensor, layout: list[Slot]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten`."""
    if vector.numel() != layout[-1].stop:
        raise ValueError(f"vector has {vector.numel()} values, the layout {layout[-1].stop}")
    return {s.name: vector[s.start:s.stop].reshape(s.shape).clone() for s in layout}


def snapshot_epochs(sample: Network | dict) -> list[int]:
    """The epochs whose weights a network's sample holds (``meta.json["snapshots"]``; 0: the start)."""
    meta = sample.meta if isinstance(sample, Network) else sample
    return list(meta.get("snapshots") or [])


def weights_at(network: Network, epoch: int) -> dict[str, Tensor]:
    """The state dict of ``network`` after ``epoch`` epochs, from its snapshots (read with them:
    :meth:`ZooDataset.network` ``(i, snapshots=True)``, or a raw sample through :func:`decode`)."""
    if epoch not in snapshot_epochs(network):
        raise KeyError(f"{network.key} has no snapshot of epoch {epoch}; it has {snapshot_epochs(network)}")
    if network.snapshots is None:
        raise ValueError(f"{network.key} was read without its snapshots")
    prefix = f"epoch_{epoch:04d}/"
    return {k[len(prefix):]: v for k, v in network.snapshots.items() if k.startswith(prefix)}


def to_module(sample: Network | dict | tuple, epoch: int | None = None) -> nn.Module:
    """A ready plain PyTorch module (eval mode) of one network: ``build(meta['architecture'])`` plus
    ``load_state_dict(strict=True)``. Accepts a :class:`Network`, a raw WebDataset sample, or a
    ``(weights or vector, meta)`` pair; ``epoch``: the weights after that epoch (its snapshots)."""
    if isinstance(sample, dict):
        sample = decode(sample)
    if isinstance(sample, Network):
        weights, meta = (sample.weights if epoch is None else weights_at(sample, epoch)), sample.meta
    else:
        if epoch is not None:
            raise ValueError("epoch= needs a Network or a raw sample (with its snapshots)")
        weights, meta = sample[0], sample[-1]
    module = build(meta["architecture"])
    if isinstance(weights, Tensor):
        weights = unflatten(weights, weight_layout(meta["architecture"]))
    module.load_state_dict(weights, strict=True)
    return module.eval()


# --------------------------------------------------------------------------- PyTorch dataset

def _task_order(dataset: str, tasks: Iterable[str]) -> list[str]:
    """Label order of a dataset's tasks: every task of the dataset table (so that labels do not
    depend on filters), then any other stored task, sorted."""
    from mlds.datasets import DATASETS
    table = list(DATASETS[dataset].tasks) if dataset in DATASETS else []
    return table + sorted(set(tasks) - set(table))


class ZooDataset(Dataset):
    """``(weight vector [P] float32, label, meta dict)`` for every network of a zoo or package.

    Filters: ``datasets``, ``tasks`` (names), ``converged`` (True/False/None),
    ``seeds`` (a ``range``, a ``(low, high)`` pair meaning ``low <= seed < high``,
    or a collection), ``recipes``; ``where(entry)`` for anything else on the
    index (:class:`~mlds.zoo.store.Entry`: seed, converged, epochs, metrics, ...).
    ``label``: ``"task"`` (index into :attr:`classes`: the tasks of the dataset
    table in table order, whatever the filters, then other stored tasks), ``"dataset"``, ``"converged"`` (0/1), ``"seed"``, or a
    callable ``meta -> label``. Order: dataset, task (table order), seed.

    A network stored twice counts once; two different versions of one key
    raise ``ValueError`` unless ``on_conflict="first"`` (keep the copy of the
    first shard in path order). Corrupt shards raise unless
    ``skip_corrupt=True`` (then they are listed in :attr:`corrupt`).
    ``snapshot=e``: the vectors are the weights after epoch ``e`` (a training snapshot), and only
    networks with that snapshot are included (one that stopped earlier lacks the later ones).
    ``split``: ``"train"``, ``"val"``, ``"test"`` (or several): only networks of that fixed benchmark
    split, a function of the seed alone (:mod:`mlds.zoo.splits`: 50% test, 40% train, 10% val).
    Use ``collate_fn=mlds.zoo.reader.collate`` with a ``DataLoader``.
    """

    def __init__(self, source, *, datasets: Iterable[str] | None = None, tasks: Iterable[str] | None = None,
                 converged: bool | None = None, seeds=None, recipes: Iterable[str] | None = None,
                 where: Callable[[Entry], bool] | None = None, label: str | Callable[[dict], object] = "task",
                 on_conflict: str = "error", skip_corrupt: bool = False, verify: bool = False,
                 snapshot: int | None = None, split: str | Iterable[str] | None = None):
        if on_conflict not in ("error", "first"):
            raise ValueError(f"on_conflict must be 'error' or 'first', got {on_conflict!r}")
        if isinstance(label, str) and label not in ("task", "dataset", "converged", "seed"):
            raise ValueError(f"unknown label {label!r}")
        keep_splits = check_split(split)
        paths = shard_paths(source)
        indexes, corrupt = [], []
        store = ZooStore(source) if not isinstance(source, (list, tuple)) and Path(source).is_dir() \
            and not is_package(source) else None
        if store is not None:
            indexes, corrupt = store.index(verify=verify)
        else:
            for p in paths:
                try:
                    indexes.append(scan_shard(p, verify=verify))
                except CorruptShardError as err:
                    corrupt.append(err)
        if corrupt and not skip_corrupt:
            raise corrupt[0]
        self.corrupt = corrupt
        catalog = build_catalog(indexes, corrupt, set(recipes) if recipes is not None else None)
        keep_ds = set(datasets) if datasets is not None else None
        keep_tasks = set(tasks) if tasks is not None else None
        if isinstance(seeds, tuple) and len(seeds) == 2:
            seeds = range(int(seeds[0]), int(seeds[1]))
        keep_seeds = set(seeds) if seeds is not None and not isinstance(seeds, range) else seeds
        entries = []
        for (dataset, task), by_seed in catalog.networks.items():
            if (keep_ds is not None and dataset not in keep_ds) or (keep_tasks is not None and task not in keep_tasks):
                continue
            for seed, entry in by_seed.items():
                if keep_seeds is not None and seed not in keep_seeds:
                    continue
                if converged is not None and entry.converged != converged:
                    continue
                if where is not None and not where(entry):
                    continue
                if keep_splits is not None and split_of(entry.seed) not in keep_splits:
                    continue
                if snapshot is not None and snapshot not in entry.snapshot_epochs:
                    continue
                if entry.key in catalog.conflicts and on_conflict == "error":
                    shards = ", ".join(sorted({c.shard for c in catalog.conflicts[entry.key]}))
                    raise ValueError(f"{entry.key} is stored in different versions ({shards}); "
                                     "pass on_conflict='first' or recipes=... to choose")
                entries.append(entry)
        by_dataset: dict[str, set[str]] = {}
        for e in entries:
            by_dataset.setdefault(e.dataset, set()).add(e.task)
        order = [(d, t) for d in sorted(by_dataset) for t in _task_order(d, by_dataset[d])]
        rank = {dt: i for i, dt in enumerate(order)}
        self.entries = sorted(entries, key=lambda e: (rank[(e.dataset, e.task)], e.seed))
        #: task names (``dataset/task`` when several datasets); the ``"task"`` label indexes this list
        self.classes = [t for _, t in order] if len(by_dataset) <= 1 else [f"{d}/{t}" for d, t in order]
        self.datasets = sorted(by_dataset)
        self._task_index = {dt: i for i, dt in enumerate(order)}
        self.label = label
        self.snapshot = snapshot
        self.split = split
        self._layout: list[Slot] | None = None
        self._architecture: dict | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def layout(self) -> list[Slot]:
        """Vector layout (from the first network's architecture; all must share it)."""
        if self._layout is None:
            if not self.entries:
                raise ValueError("empty dataset has no layout")
            self._architecture = read_entry(self.entries[0]).meta["architecture"]
            self._layout = weight_layout(self._architecture)
        return self._layout

    def network(self, i: int, snapshots: bool = False) -> Network:
        """Network ``i`` (with ``snapshots``: its weights along training too, for :func:`weights_at`)."""
        return read_entry(self.entries[i], snapshots=snapshots)

    def _label(self, entry: Entry, meta: dict):
        if callable(self.label):
            return self.label(meta)
        if self.label == "task":
            return self._task_index[(entry.dataset, entry.task)]
        if self.label == "dataset":
            return self.datasets.index(entry.dataset)
        if self.label == "converged":
            return int(entry.converged)
        return entry.seed

    def __getitem__(self, i: int) -> tuple[Tensor, object, dict]:
        entry = self.entries[i]
        net = read_entry(entry, snapshots=self.snapshot is not None)
        layout = self.layout
        if net.meta["architecture"].get("name") != self._architecture.get("name"):
            raise ValueError(f"{entry.key} has architecture {net.meta['architecture'].get('name')}, "
                             f"the dataset {self._architecture.get('name')}; filter one dataset")
        weights = net.weights if self.snapshot is None else weights_at(net, self.snapshot)
        return flatten(weights, layout), self._label(entry, net.meta), net.meta


def collate(batch: list[tuple[Tensor, object, dict]]) -> tuple[Tensor, object, list[dict]]:
    """``DataLoader`` collate: stacked vectors ``[B, P]``, labels as a tensor when numeric, metas as a list."""
    vectors = torch.stack([b[0] for b in batch])
    labels = [b[1] for b in batch]
    if all(isinstance(x, (int, float, bool)) for x in labels):
        labels = torch.tensor(labels)
    return vectors, labels, [b[2] for b in batch]
