"""The zoo store: trained networks as WebDataset tar shards under a root folder.

Layout: ``<root>/<dataset>/<task>/<dataset>-<task>-<recipe>-<first seed>-<last seed>-<id>.tar``.
One sample per network, key ``<dataset>-<task>-<seed:06d>``, entries
``weights.safetensors`` (plain state dict) and ``meta.json``. A shard is written
under a hidden temporary name, flushed to disk and renamed only when complete,
so a file ending in ``.tar`` is always a finished shard.
"""
from __future__ import annotations


import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

SHARD_SUFFIX = ".tar"


def sample_key(dataset: str, task: str, seed: int) -> str:
    """WebDataset key of one network: ``ds1-parity-000042`` (no dots)."""
    key = f"{dataset}-{task}-{int(seed):06d}"
    if "." in key or "/" in key:
        raise ValueError(f"dataset and task names may not contain '.' or '/': {key!r}")
    return key


@dataclass
class Network:
    """One zoo sample: plain state dict and metadata."""

    key: str
    weights: dict[str, Tensor]
    meta: dict


class CorruptShardError(RuntimeError):
    """A shard that cannot be read completely."""


class ZooStore:
    """Writes and lists the shards of a zoo root."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def task_dir(self, dataset: str, task: str) -> Path:
        return self.root / dataset / task

    def shards(self, dataset: str | None = None) -> list[Path]:
        """Finished shards, sorted, optionally of one dataset."""
        base = self.root / dataset if dataset else self.root
        if not base.exists():
            return []
        return sorted(p for p in base.rglob(f"*{SHARD_SUFFIX}") if not p.name.startswith("."))

    def write_shard(self, dataset: str, task: str, recipe: str, networks: list[Network]) -> Path:
        """Atomically write ``networks`` (of one task and recipe) as a new shard; returns its path."""
        if not networks:
            raise ValueError("no networks to write")
        seeds = [n.meta["seed"] for n in networks]
        folder = self.task_dir(dataset, task)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{dataset}-{task}-{recipe}-{min(seeds):06d}-{max(seeds):06d}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
        final = folder / name
        partial = folder / f".{name}.partial"
        try:
            with open(partial, "wb") as stream:
                with wds.TarWriter(stream) as writer:
                    for net in networks:
                        writer.write(encode(net))
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(partial, final)
            _fsync_dir(folder)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return final

    def keys(self, dataset: str, task: str, recipe: str | None = None) -> set[str]:
        """Keys stored for a task (only those trained with ``recipe``, if given)."""
        found = set()
        for shard in self.shards(dataset):
            if shard.parent.name != task or (recipe and f"-{recipe}-" not in shard.name):
                continue
            found.update(shard_keys(shard))
        return found


def encode(net: Network) -> dict:
    """WebDataset sample dict of a network."""
    return {"__key__": net.key,
            "weights.safetensors": save_safetensors({k: v.contiguous() for k, v in net.weights.items()}),
            "meta.json": json.dumps(net.meta, sort_keys=True).encode()}


def decode(sample: dict) -> Network:
    """Inverse of :func:`encode` (never unpickles)."""
    return Network(sample["__key__"], load_safetensors(sample["weights.safetensors"]),
                   json.loads(sample["meta.json"]))


def shard_keys(shard: Path) -> list[str]:
    """Keys of the samples in a shard, from its tar headers."""
    try:
        with tarfile.open(shard, "r:") as tar:
            names = tar.getnames()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise CorruptShardError(f"{shard}: {err}") from err
    return sorted({name.split(".", 1)[0] for name in names})


def read_shard(shard: Path) -> Iterator[Network]:
    """The networks of one shard, read with webdataset."""
    for sample in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False):
        yield decode(sample)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


