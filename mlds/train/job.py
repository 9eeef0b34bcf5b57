"""One training job: build the task, train the job's seeds as populations, store them.

Signals: see :mod:`mlds.train.interrupts`.
"""
from __future__ import annotations

import logging
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from functools import lru_cache, partial
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
import torch
from omegaconf import DictConfig

import mlds
from mlds.datasets import build_task
from mlds.nets.registry import build, param_count, population, population_from_seeds
from mlds.train.checks import ConfigError, job_seeds, validate
from mlds.train.engine import NetworkRecord, PopulationModule, evaluate
from mlds.train.interrupts import STATE, JobInterrupted, JobInterruptedError, interruptible, storing
from mlds.train.optim import optimizer_factory, scheduler_factory
from mlds.train.progress import SweepProgress
from mlds.train.sizing import auto_population_size
from mlds.train.recipe import FILE_KEYS, RUNTIME_KEYS, recipe, recipe_hash
from mlds.tasks.task import Task
from mlds.zoo.store import Network, ZooStore, sample_key

log = logging.getLogger(__name__)
# Jobs use a plain LightningEnvironment on purpose (see train_population), so Lightning's hint to
# launch through srun on hosts with SLURM installed is noise.
warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# Lightning adds its own console handler at import; its INFO lines (GPU available, tips) are noise in a job's log.
for _name in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def non_finite(net: Network) -> list[str]:
    """Names of a network's tensors (weights, snapshots) that hold NaN or infinity."""
    tensors = {**net.weights, **(net.snapshots or {})}
    return sorted(name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def train_job(cfg: DictConfig, log_dir: str | None = None) -> list[Path]:
    """Train the job's seeds that are not stored yet, ``population.size`` at a time;
    returns the shards written.

    Resume rule: a seed counts as stored when its key is in a sound shard of
    the same recipe (:func:`mlds.train.recipe.recipe_hash`); a population shrinks to
    its missing seeds. The store is looked at again before each population, so
    sweeps running side by side skip what the other has stored meanwhile.
    One line per finished population reports the sweep's networks done / total
    and ETA (:mod:`mlds.train.progress`).

    The zoo root is checked for writing (a probe file in the task's folder)
    before any training. A network whose weights are not finite (it diverged)
    is never stored: it is recorded in ``<root>/.failed`` and named in a
    warning, and the rest of its population is stored. SIGTERM and SIGINT raise
    :class:`JobInterrupted` (module docstring).
    """
    validate(cfg)
    with interruptible():
        try:
            return _train_job(cfg, log_dir)
        except JobInterrupted as err:
            if os.environ.get("SUBMITIT_FOLDER"):  # a submitit job: only an Exception reaches the sweep
                raise JobInterruptedError(str(err), err.code) from None
            raise


def _train_job(cfg: DictConfig, log_dir: str | None) -> list[Path]:
    rec = recipe(cfg)
    task = build_task(rec, {k: cfg.data.get(k) for k in FILE_KEYS})
    store = ZooStore(cfg.zoo.root)
    recipe_id = recipe_hash(rec)
    runtime = {k: cfg.train.get(k) for k in RUNTIME_KEYS}
    seeds = job_seeds(cfg)
    progress = SweepProgress.for_job(len(seeds))
    name = f"{task.dataset}/{task.name}"
    STATE.job = name

    def missing(candidates: list[int]) -> list[int]:
        stored = store.keys(task.dataset, task.name, recipe_id)
        return [s for s in candidates if sample_key(task.dataset, task.name, s) not in stored]

    todo = missing(seeds)
    if len(todo) < len(seeds):
        message = f"{name}: {len(seeds) - len(todo)} of {len(seeds)} networks already stored (recipe {recipe_id})"
        progress.record("stored", len(seeds) - len(todo), message)
        log.info("%s | %s", message, progress.line())
    if not todo:
        return []
    try:
        store.check_writable(task.dataset, task.name)
    except OSError as err:
        raise ConfigError(f"zoo.root={cfg.zoo.root} cannot be written: {err}") from None
    if cfg.train.get("threads"):
        torch.set_num_threads(int(cfg.train.threads))
    shards = []
    size = (auto_population_size(rec, task, len(todo), str(runtime.get("accelerator")))
            if cfg.population.size == "auto" else int(cfg.population.size))
    progress.record("start", 0)
    for start in range(0, len(todo), size):
        population = todo[start : start + size]
        if start:  # another sweep may have stored some of them meanwhile
            population = missing(population)
            if len(population) < len(todo[start : start + size]):
                progress.record("stored", len(todo[start : start + size]) - len(population))
            if not population:
                continue
        began = time.perf_counter()
        STATE.population = f"{name} seeds {population[0]}..{population[-1]}, {len(population)} networks"
        networks = train_population(rec, task, population, runtime, log_dir)
        good = [n for n in networks if not non_finite(n)]
        failed = [n for n in networks if non_finite(n)]
        with storing():
            records = [store.record_failure(task.dataset, task.name, recipe_id, int(n.meta["seed"]),
                                            "non-finite weights (NaN or infinity) in " + ", ".join(non_finite(n)[:5]),
                                            n.meta) for n in failed]
            if good:
                shards.append(store.write_shard(task.dataset, task.name, recipe_id, good))
            STATE.population = None
            STATE.stored += len(good)
        if failed:
            warning = (f"{len(failed)} of {len(networks)} networks of {name} have non-finite weights (they diverged) "
                       f"and were NOT stored: seeds {', '.join(str(n.meta['seed']) for n in failed)}; recorded in "
                       f"{records[0].parent}; " + ("the others are stored" if good else "none of this population "
                                                   "is stored"))
            log.warning("%s", warning)
        converged = sum(n.meta["converged"] for n in good)
        message = (f"stored {len(good)} networks of {name} (seeds {population[0]}..{population[-1]}, {converged} "
                   f"converged, {time.perf_counter() - began:.1f} s) in {shards[-1].name}" if good else
                   f"stored none of {len(networks)} networks of {name} (seeds {population[0]}..{population[-1]}): "
                   "all have non-finite weights")
        progress.record("trained", len(networks), message)
        log.info("%s | %s", message, progress.line())
    return shards


def seed_ranges(seeds: list[int]) -> list[list[int]]:
    """Seeds in order as ``[first, last]`` runs of consecutive seeds: ``[0, 1, 2, 5] -> [[0, 2], [5, 5]]``
    (a population of thousands stays a few numbers in every meta.json)."""
    runs: list[list[int]] = []
    for s in seeds:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return runs


def expand_seed_ranges(runs: list[list[int]]) -> list[int]:
    """Inverse of :func:`seed_ranges`."""
    return [s for first, last in runs for s in range(first, last + 1)]


def show_progress_bar(setting) -> bool:
    """``train.progress``: true / false, or ``auto``: Lightning's bar for a single run in a terminal, none in
    a multirun (its sweeper shows one display for the whole sweep)."""
    if setting != "auto":
        return bool(setting)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return False
    except ImportError:
        pass
    return sys.stderr.isatty()


def population_module(rec: dict, task: Task, seeds: list[int], snapshots=()) -> PopulationModule:
    """The population engine for networks ``seeds`` of recipe ``rec``, each at its initial weights;
    ``snapshots``: epochs after which to keep every network's weights (0: the initial weights)."""
    spec, train = rec["architecture"], rec["train"]
    return PopulationModule(population_from_seeds(spec, seeds), task, seeds, optimizer_factory(rec["optim"]),
                            train["batch_size"], train["stop_loss"], scheduler=scheduler_factory(rec.get("scheduler")),
                            snapshots=snapshots)


def train_population(rec: dict, task: Task, seeds: list[int], runtime: dict, log_dir: str | None = None
                     ) -> list[Network]:
    """Train networks ``seeds`` of recipe ``rec`` (its task ``task``) together; returns them with their
    metadata. ``runtime``: where and how visibly (``accelerator``, ``devices``, ``progress``) and which
    ``snapshots`` to keep (epochs; they do not change a network, so they are not in its recipe)."""
    started = time.perf_counter()
    module = population_module(rec, task, seeds, runtime.get("snapshots") or ())
    # Under SLURM, Lightning's default SLURMEnvironment would catch SIGUSR1, write hpc_ckpt_*.ckpt into
    # default_root_dir (the working directory) and requeue, and every later fit() started there would restore
    # that checkpoint, whatever its population: a plain environment and the job's own folder prevent both.
    # Preemption is submitit's (USR2: requeue) and the store's (a rerun skips stored networks).
    trainer = L.Trainer(
        max_epochs=int(rec["train"]["max_epochs"]), accelerator=runtime.get("accelerator") or "auto",
        devices=runtime.get("devices") or 1,
        logger=L.pytorch.loggers.CSVLogger(log_dir) if log_dir else False, enable_checkpointing=False,
        num_sanity_val_steps=0, enable_progress_bar=show_progress_bar(runtime.get("progress")),
        enable_model_summary=False,
        log_every_n_steps=1, plugins=[LightningEnvironment()],
        default_root_dir=log_dir)
    try:
        trainer.fit(module)
    except SIGTERMException:  # Lightning's answer to SIGTERM where another handler owns it: a bare SystemExit
        raise JobInterrupted(signal.SIGTERM, STATE.population, STATE.stored, STATE.job) from None
    if trainer.received_sigterm:  # it arrived as the last epoch ended
        raise JobInterrupted(signal.SIGTERM, STATE.population, STATE.stored, STATE.job)
    wall = time.perf_counter() - started
    metrics = final_metrics(rec["architecture"], module.records, module.task, module.device)
    data = task.network_data(seeds) if task.network_data else None
    return [Network(sample_key(task.dataset, task.name, r.seed), r.state_dict,
                    {**network_meta(rec, task, r, metrics[i], wall, seeds, module.device.type),
                     **({} if data is None else data.describe(i))},
                    {f"epoch_{e:04d}/{name}": t for e, sd in sorted(r.snapshots.items()) for name, t in sd.items()}
                    or None)
            for i, r in enumerate(module.records)]


def final_metrics(spec: dict, records: list[NetworkRecord], task: Task, device) -> list[dict]:
    """Loss and accuracy of each final network on the training set and every evaluation split (each
    network on its own view of the data, where the task gives one)."""
    net = population(spec, [r.state_dict for r in records]).to(device)
    data = task.network_data([r.seed for r in records]).to(device) if task.network_data else None
    splits = {"train": task.train, **task.evals}
    scores = {name: evaluate(net, split, task.loss, view=None if data is None else partial(data.apply, name))
              for name, split in splits.items()}
    return [{name: {"loss": float(loss[k]), "acc": float(acc[k])} for name, (loss, acc) in scores.items()}
            for k in range(len(records))]


def network_meta(rec: dict, task: Task, record: NetworkRecord, metrics: dict, wall: float, population: list[int],
                 device: str) -> dict:
    """The ``meta.json`` of one network (SPEC: what one zoo sample holds); ``config`` is its recipe
    and seed, enough to train it again; ``population``: the seeds it was trained with, in order
    (training them together again gives it bit for bit on the same software and device type)."""
    spec = rec["architecture"]
    return {
        "dataset": task.dataset, "task": task.name, "seed": record.seed, "data_seed": int(rec["data_seed"]),
        "architecture": {"name": spec["name"], "param_count": param_count(build(spec)), **spec},
        "config": {**rec, "seed": record.seed}, "recipe": recipe_hash(rec), "zoo_version": rec["zoo_version"],
        "epochs": record.epochs, "converged": record.converged, "stop_loss": float(rec["train"]["stop_loss"]),
        "metrics": metrics, "history": record.history, "task_description": task.description, **task.meta,
        "wall_time_s": wall, "population_size": len(population), "population": seed_ranges(population),
        "snapshots": sorted(record.snapshots), "device": device, "versions": versions(),
        "code_revision": code_revision(),
    }


@lru_cache(maxsize=1)
def versions() -> dict:
    import hydra
    import numpy
    import safetensors
    import webdataset
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__,
            "hydra": hydra.__version__, "numpy": numpy.__version__, "webdataset": webdataset.__version__,
            "safetensors": safetensors.__version__, "mlds": mlds.__version__}


@lru_cache(maxsize=1)
def code_revision() -> str:
    """Git commit of the mlds source (``+dirty`` with local changes), or ``unknown``."""
    src = Path(mlds.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
