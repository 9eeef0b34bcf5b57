"""Hydra sweeper that packs a seed sweep into populations.

It expands the sweep exactly like Hydra's basic sweeper, then merges jobs that
differ in nothing but ``seed`` into one job per ``population.size`` seeds, with
the override ``seeds=[...]``. Any launcher (basic, joblib, submitit) then runs
one population per job. Every job's config is composed and checked by
:func:`mlds.config.validate` before the first job starts.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override

log = logging.getLogger(__name__)

SEED_PREFIXES = ("seed=", "+seed=", "++seed=")
SIZE_PREFIX = "population.size="


def count_networks(jobs: Sequence[Sequence[str]]) -> int:
    """Networks a list of packed jobs trains: the seeds of each ``seeds=[...]``, else one."""
    total = 0
    for job in jobs:
        lists = [o.split("=", 1)[1] for o in job if o.startswith(("seeds=", "+seeds=", "++seeds="))]
        values = lists[-1].strip().strip("[]").strip() if lists else ""
        total += len([v for v in values.split(",") if v.strip()]) if lists else 1
    return total


def pack_seeds(jobs: Sequence[Sequence[str]], population_size: int) -> list[list[str]]:
    """Merge jobs (lists of overrides) that differ only in ``seed`` into jobs of at most
    ``population_size`` seeds each (a job's own ``population.size=`` override wins)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    passthrough: list[list[str]] = []
    for job in jobs:
        seeds = [o.split("=", 1)[1] for o in job if o.startswith(SEED_PREFIXES)]
        if not seeds:
            passthrough.append(list(job))
            continue
        rest = tuple(o for o in job if not o.startswith(SEED_PREFIXES))
        groups.setdefault(rest, []).append(int(seeds[-1]))
    packed = []
    for rest, seeds in groups.items():
        size = population_size
        for o in rest:
            if o.startswith(SIZE_PREFIX):
                size = int(o[len(SIZE_PREFIX):])
        if size < 1:
            raise ValueError(f"population.size must be positive, got {size}")
        unique = list(dict.fromkeys(seeds))
        for i in range(0, len(unique), size):
            packed.append([*rest, f"seeds=[{','.join(str(s) for s in unique[i:i + size])}]"])
    return packed + passthrough


class PopulationSweeper(BasicSweeper):
    """Basic sweeper + seed packing (see module docstring)."""

    def __init__(self, population_size: int, max_batch_size: int | None = None, params: dict | None = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.population_size = int(population_size)

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
        packed = pack_seeds(jobs, self.population_size)
        n_seeds = sum(1 for job in jobs if any(o.startswith(SEED_PREFIXES) for o in job))
        log.info("population sweeper: %d runs packed into %d jobs (%d seeded runs, population.size=%d)",
                 len(jobs), len(packed), n_seeds, self.population_size)
        self._record_total(packed)
        step = max_batch_size or max(len(packed), 1)
        return [packed[i : i + step] for i in range(0, len(packed), step)]

    def _record_total(self, packed: list[list[str]]) -> None:
        """Write the sweep's expected number of networks for the jobs' progress lines (mlds.progress)."""
        if getattr(self, "config", None) is None:  # not set up by Hydra (unit use of split_arguments)
            return
        try:
            from mlds.progress import start_sweep

            start_sweep(self.config.hydra.sweep.dir, count_networks(packed), len(packed))
        except Exception as err:  # progress is a convenience; never stop a sweep for it
            log.warning("population sweeper: cannot record the sweep's total for progress: %s", err)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from mlds.config import validate

        for overrides in batch:
            validate(self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides)))
