"""Hydra sweeper that packs a seed sweep into populations.

It expands the sweep exactly like Hydra's basic sweeper, except for ``seed``:
the seeds of each combination of the other overrides become jobs of at most
``population.size`` seeds, each with the override ``seeds=[...]``. Any launcher
(basic, joblib, submitit) then runs one population per job. Every job's config
is composed and checked by :func:`mlds.train.checks.validate` before the first
job of the sweep starts (with ``max_batch_size`` too, for every batch).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

log = logging.getLogger(__name__)


class Packing(NamedTuple):
    """The jobs of a sweep (each a list of override strings) and how many networks they train.
    (A NamedTuple: Hydra's plugin discovery imports this module outside ``sys.modules``,
    where dataclasses fail.)"""

    jobs: list[list[str]]
    networks: int


def _values(override: Override) -> list:
    return list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]


def pack(overrides: Sequence[Override], population_size: int, workers: int = 1) -> Packing:
    """Expand ``overrides`` like Hydra's basic sweeper, with the ``seed`` values of each combination of
    the other overrides packed into jobs of at most ``population_size`` seeds (``seeds=[...]``; a
    ``population.size=N`` override wins). Without a ``seed`` override each job trains the config's seed.

    When that gives fewer jobs than ``workers`` (parallel worker processes), populations are made
    smaller so that every worker has a job: packing never changes a network. ``population_size="auto"``:
    all seeds of a combination in one job (the job splits them by what its device holds)."""
    seed = [o for o in overrides if o.key_or_group == "seed"]
    size = [o for o in overrides if o.key_or_group == "population.size"]
    rest = [o for o in overrides if o.key_or_group != "seed"]
    if size:
        if size[-1].is_sweep_override():
            raise HydraException("population.size cannot be swept: packing never changes a network, "
                                 "choose one size")
        population_size = size[-1].value()
    auto = population_size == "auto"
    if not auto and (isinstance(population_size, bool) or not isinstance(population_size, int)
                     or population_size < 1):
        raise HydraException(f"population.size must be a positive integer or auto, got {population_size!r}")
    combos = [job for batch in BasicSweeper.split_arguments(rest, None) for job in batch]
    if not seed:
        return Packing(combos, len(combos))
    seeds = list(dict.fromkeys(_values(seed[-1])))
    if auto:
        population_size = max(len(seeds), 1)
    if combos and len(combos) * -(-len(seeds) // population_size) < workers:
        population_size = max(1, -(-len(seeds) // -(-workers // len(combos))))
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise HydraException(f"seeds must be non-negative integers, got {bad[:5]}")
    if not seeds:
        raise HydraException(f"the seed sweep '{seed[-1].input_line}' selects no seeds")
    chunks = [seeds[i : i + population_size] for i in range(0, len(seeds), population_size)]
    jobs = [[*combo, f"seeds=[{','.join(map(str, chunk))}]"] for combo in combos for chunk in chunks]
    return Packing(jobs, len(combos) * len(seeds))


class PopulationSweeper(BasicSweeper):
    """Basic sweeper + seed packing (see module docstring)."""

    def __init__(self, population_size: int, max_batch_size: int | None = None, params: dict | None = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.population_size = population_size
        self._checked = False

    def _launcher(self) -> str:
        """``local`` (joblib worker processes), ``slurm`` (submitit) or ``basic`` (in this process)."""
        target = str((getattr(self, "config", None) or {}).get("hydra", {}).get("launcher", {}).get("_target_", ""))
        return "local" if "Joblib" in target else "slurm" if "submitit" in target.lower() else "basic"

    def _workers(self) -> int:
        """Jobs that run at the same time on this machine (the local launcher's worker processes)."""
        if self._launcher() != "local":
            return 1
        n_jobs = int(self.config.hydra.launcher.get("n_jobs") or -1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return cores if n_jobs < 0 else n_jobs

    def sweep(self, arguments: list[str]):
        """Hydra's sweep; where the jobs run in other processes (local cores, SLURM), this terminal
        shows one display for the whole sweep (:class:`mlds.train.progress.SweepDisplay`)."""
        if self._launcher() == "basic":
            return super().sweep(arguments)
        from mlds.train.progress import SweepDisplay

        display = SweepDisplay(self.config.hydra.sweep.dir)
        self._display = display
        try:
            return super().sweep(arguments)
        finally:
            display.stop()

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        packing = pack(overrides, self.population_size, self._workers() if getattr(self, "config", None) else 1)
        if not packing.jobs:
            raise HydraException("the sweep has no jobs (an empty sweep or a glob that matches nothing)")
        log.info("population sweeper: %d networks packed into %d jobs", packing.networks, len(packing.jobs))
        self._record_total(packing)
        jobs = packing.jobs
        if getattr(self, "config", None) is not None and self._launcher() == "local":
            # worker processes log to their job folder only: the display owns the terminal
            jobs = [[*job, "hydra.job_logging.root.handlers=[file]"] for job in jobs]
        step = max_batch_size or len(jobs)
        return [jobs[i : i + step] for i in range(0, len(jobs), step)]

    def _record_total(self, packing: Packing) -> None:
        """Write the sweep's expected number of networks for the jobs' progress lines (mlds.train.progress)."""
        if getattr(self, "config", None) is None:  # not set up by Hydra
            return
        try:
            from mlds.train.progress import start_sweep

            start_sweep(self.config.hydra.sweep.dir, packing.networks, len(packing.jobs))
            if getattr(self, "_display", None) is not None:
                self._display.start()
        except Exception as err:  # progress is a convenience; never stop a sweep for it
            log.warning("population sweeper: cannot record the sweep's total for progress: %s", err)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """On the first batch, compose and check every job of the sweep (all batches), so that a bad
        job stops the sweep before anything runs."""
        if self._checked:
            return
        from mlds.train.checks import validate

        for job in (job for jobs in self.overrides for job in jobs):
            validate(self.hydra_context.config_loader.load_sweep_config(self.config, list(job)))
        self._checked = True
