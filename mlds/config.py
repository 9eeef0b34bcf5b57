"""Checks and identities derived from a composed training config."""
from __future__ import annotations

import hashlib
import json

from omegaconf import DictConfig, OmegaConf

# Config nodes that decide what a network becomes (besides its seed).
RECIPE_KEYS = ("dataset", "machine", "trigger", "automaton", "data", "data_seed", "architecture", "train", "optim",
               "scheduler")
# Settings under train that change where or how visibly training runs, not its result.
RUNTIME_KEYS = ("accelerator", "devices", "threads", "progress")


class ConfigError(ValueError):
    """A training config that cannot be run."""


def job_seeds(cfg: DictConfig) -> list[int]:
    """Seeds this job trains: ``seeds`` (set by the population sweeper) or ``[seed]``."""
    seeds = [cfg.seed] if cfg.get("seeds") is None else list(cfg.seeds)
    return [int(s) for s in seeds]


def recipe(cfg: DictConfig) -> dict:
    """The resolved settings that, with the seed, determine a network (a setting that is
    null, such as ``scheduler`` when none is chosen, is left out: it means "not used")."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    out = {k: resolved[k] for k in RECIPE_KEYS if resolved.get(k) is not None}
    out["train"] = {k: v for k, v in out.get("train", {}).items() if k not in RUNTIME_KEYS}
    return out


def recipe_hash(cfg: DictConfig) -> str:
    """Short stable hash of :func:`recipe`: networks of equal key and hash are the same network."""
    blob = json.dumps(recipe(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for settings that cannot train; cheap, runs before any work."""
    def positive(path: str, kind=int):
        value = OmegaConf.select(cfg, path)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
            raise ConfigError(f"{path} must be a positive {kind.__name__}, got {value!r}")
        if value <= 0:
            raise ConfigError(f"{path} must be positive, got {value}")

    for path in ("data.n_train", "data.n_val", "data.n_test", "data.seq_len", "data.n_states", "data.n_inputs",
                 "data.n_outputs", "train.max_epochs", "train.batch_size", "population.size"):
        positive(path)
    for path in ("optim.lr", "train.stop_loss"):
        positive(path, float)
    gamma = OmegaConf.select(cfg, "scheduler.gamma")
    if gamma is not None and not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
        raise ConfigError(f"scheduler.gamma must be in (0, 1], got {gamma!r}")
    for path in ("data.poison_fraction", "data.write_prob"):
        value = OmegaConf.select(cfg, path)
        if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ConfigError(f"{path} must be in [0, 1], got {value!r}")
    seeds = job_seeds(cfg)
    if any(s < 0 for s in seeds):
        raise ConfigError(f"seeds must be non-negative, got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"duplicate seeds in one job: {seeds}")
    if OmegaConf.select(cfg, "automaton") is not None and int(cfg.automaton) < 0:
        raise ConfigError(f"automaton must be a non-negative id, got {cfg.automaton}")
    if "trigger" in cfg and cfg.trigger is not None:
        from hydra.utils import instantiate
        try:
            trigger = instantiate(cfg.trigger)
        except Exception as err:  # Hydra wraps the constructor's error
            raise ConfigError(f"invalid trigger: {err.__cause__ or err}") from err
        data = cfg.data
        if data.seq_len < len(trigger.commands) + trigger.window:
            raise ConfigError(f"data.seq_len={data.seq_len} is too short for the trigger and its window")
