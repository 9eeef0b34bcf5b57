"""Proof by retraining: train stored networks again from their ``meta.json`` alone and compare.

A network's ``meta.json`` holds its recipe (``config``) and the seeds it was trained
with (``population``); training that population again gives it bit for bit on the
same software and device type. Where the zoo version, torch version or device type
differ, bitwise identity is not expected: the weights must then agree to
``tolerance`` and the recorded metrics to ``metric_tolerance``, and the report says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from mlds.datasets import build_task
from mlds.train.job import expand_seed_ranges, train_population, versions
from mlds.train.recipe import ZOO_VERSION, recipe_hash
from mlds.zoo.reader import ZooDataset
from mlds.zoo.store import WEIGHTS, CorruptShardError, Network, encode, sha256_bytes


@dataclass
class Reproduction:
    """What retraining one stored network showed."""

    key: str
    identical: bool  # weights bit for bit (SHA-256 of the safetensors bytes)
    max_weight_diff: float
    max_metric_diff: float
    passed: bool
    notes: list[str] = field(default_factory=list)


def differences(meta: dict, device: str) -> list[str]:
    """Why bitwise identity is not to be expected here (empty: it is)."""
    notes = []
    if meta.get("zoo_version") != ZOO_VERSION:
        notes.append(f"trained under zoo_version {meta.get('zoo_version')}, this MLDS is {ZOO_VERSION}")
    torch_then = (meta.get("versions") or {}).get("torch")
    if torch_then != versions()["torch"]:
        notes.append(f"trained with torch {torch_then}, this is {versions()['torch']}")
    if meta.get("device") != device:
        notes.append(f"trained on {meta.get('device')}, retrained on {device}")
    return notes


def _metric_diff(recorded: dict, again: dict) -> float:
    diffs = [abs(recorded[split][m] - again[split][m]) for split in recorded for m in ("loss", "acc")
             if split in again and m in recorded[split]]
    missing = set(recorded) ^ set(again)
    return float("inf") if missing else max(diffs, default=0.0)


def reproduce(stored: list[Network], accelerator: str = "cpu", files: dict | None = None, tolerance: float = 1e-4,
              metric_tolerance: float = 1e-3) -> list[Reproduction]:
    """Retrain ``stored`` networks (grouped by the population they were trained in) and compare each
    with its stored weights, snapshots and metrics."""
    device = "cuda" if accelerator in ("gpu", "cuda") else "cpu"
    groups: dict[tuple, list[Network]] = {}
    for net in stored:
        population = tuple(expand_seed_ranges(net.meta["population"]) if net.meta.get("population")
                           else [net.meta["seed"]])
        groups.setdefault((net.meta["recipe"], net.meta["task"], population), []).append(net)
    results = []
    for (recorded_hash, _, population), nets in groups.items():
        rec = {k: v for k, v in nets[0].meta["config"].items() if k != "seed"}
        if recipe_hash(rec) != recorded_hash:
            results += [Reproduction(n.key, False, float("inf"), float("inf"), False,
                                     [f"meta.json's config hashes to {recipe_hash(rec)}, not its recipe "
                                      f"{recorded_hash}"]) for n in nets]
            continue
        snapshots = sorted({e for n in nets for e in n.meta.get("snapshots") or []})
        again = {n.key: n for n in train_population(rec, build_task(rec, files), list(population),
                                                    {"accelerator": accelerator, "devices": 1, "progress": False,
                                                     "snapshots": snapshots})}
        for net in nets:
            new = again[net.key]
            notes = differences(net.meta, device)
            identical = sha256_bytes(encode(new)[WEIGHTS]) == net.meta.get("weights_sha256")
            weight_diff = max((new.weights[k] - net.weights[k]).abs().max().item() for k in net.weights)
            if net.snapshots:
                stored_epochs, new_epochs = set(net.snapshots), set(new.snapshots or {})
                if stored_epochs - new_epochs:
                    notes.append("snapshots missing when retrained")
                    weight_diff = float("inf")
                else:
                    weight_diff = max(weight_diff, *((new.snapshots[k] - v).abs().max().item()
                                                     for k, v in net.snapshots.items()))
            metric_diff = _metric_diff(net.meta["metrics"], new.meta["metrics"])
            if identical and weight_diff == 0.0:
                passed = metric_diff <= 1e-6
            else:
                passed = bool(notes) and weight_diff <= tolerance and metric_diff <= metric_tolerance
                if not notes:
                    notes.append("same software and device type: bitwise identity expected")
                else:
                    notes.append(f"tolerance {tolerance:g} on weights, {metric_tolerance:g} on metrics")
            results.append(Reproduction(net.key, identical, weight_diff, metric_diff, passed, notes))
    return results


def pick(keys: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` keys drawn without replacement by ``seed`` (a reproducible spot check)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(keys), generator=generator).tolist()
    return [keys[i] for i in order[:n]]


def check(source: str, keys: list[str], random: int | None, sample_seed: int, accelerator: str, data_root: str | None,
          console: Console) -> int:
    """Retrain networks ``keys`` (and ``random`` more) of a zoo, package or shard; print a table; returns
    the exit status: 0 when all reproduce, 1 when one does not, 2 on bad input."""
    try:
        zoo = ZooDataset(source, on_conflict="first")
    except (FileNotFoundError, CorruptShardError, ValueError) as err:
        console.print(f"error: {err}")
        return 2
    index = {e.key: i for i, e in enumerate(zoo.entries)}
    if random:
        keys = keys + pick(sorted(index), random, sample_seed)
    unknown = [k for k in keys if k not in index]
    if not keys or unknown:
        console.print(f"error: {'no networks named' if not keys else 'not in ' + source + ': ' + ', '.join(unknown)}")
        return 2
    stored = [zoo.network(index[k], snapshots=True) for k in dict.fromkeys(keys)]
    results = reproduce(stored, accelerator, {"root": data_root} if data_root else None)
    table = Table(title=f"reproduced from meta.json: {source}")
    for column in ("network", "weights", "largest weight difference", "largest metric difference", "result", "notes"):
        table.add_column(column)
    for r in results:
        table.add_row(r.key, "identical (SHA-256)" if r.identical else "differ", f"{r.max_weight_diff:.3g}",
                      f"{r.max_metric_diff:.3g}", "[green]reproduces[/]" if r.passed else "[red]DOES NOT reproduce[/]",
                      "; ".join(r.notes))
    console.print(table)
    failed = [r.key for r in results if not r.passed]
    console.print(f"{len(results) - len(failed)} of {len(results)} networks reproduce"
                  + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
