"""A network's identity: its recipe, the meaning of every setting that shapes it.

A stored network is named by ``(dataset, task, seed)``; its *recipe* tells
apart networks of one key trained differently. The recipe says what the
training *means*, by stable names and values (``machine: parity``,
``optim: {name: adam, lr: 0.003}``), never where code lives: no import path, no
``_target_``, so moving or renaming modules does not re-identify a zoo.

Two rules keep identities stable as MLDS grows:

- ``ZOO_VERSION`` is part of every recipe. Bump it when a change alters what
  training produces from the same recipe (an engine bug fix); the golden test
  (``tests/test_identity.py``) fails until you do.
- A new setting whose default reproduces the behaviour from before it existed
  is listed in ``NEUTRAL`` with that default: at that value it is left out of
  the recipe, so every network trained before the setting existed keeps its
  hash. Any other new setting changes the hashes of the recipes it appears in,
  and the golden test says so.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Bump when training the same recipe gives different networks than before.
ZOO_VERSION = 1
# Settings under ``train`` that change where or how visibly training runs, not its result.
RUNTIME_KEYS = ("accelerator", "devices", "threads", "progress", "snapshots")
# Settings under ``data`` that say where data files are, not what the data is (DS4 MNIST).
FILE_KEYS = ("root", "download")
# Settings added after ZOO_VERSION 1 and the value that reproduces the behaviour before them
# (dotted paths into the recipe): left out of the recipe at that value.
NEUTRAL: dict[str, Any] = {}


class RecipeError(ValueError):
    """A config whose recipe would name code instead of meaning."""


def recipe(cfg: DictConfig) -> dict:
    """The recipe of a composed training config: with the seed, it determines a network.

    ``{zoo_version, dataset, task, data, data_seed, architecture, train, optim[, scheduler]}``;
    ``task`` is the dataset's task node (``conf/dataset/*.yaml``: machine, trigger, automaton
    by stable names); a scheduler is present only when one is chosen.
    """
    r = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
         for k in ("dataset", "data", "data_seed", "architecture", "train", "optim", "scheduler") if k in cfg}
    out = {"zoo_version": ZOO_VERSION, "dataset": r["dataset"]["name"], "task": r["dataset"]["task"],
           "data": {k: v for k, v in r["data"].items() if k not in FILE_KEYS}, "data_seed": r["data_seed"], "architecture": r["architecture"],
           "train": {k: v for k, v in r["train"].items() if k not in RUNTIME_KEYS}, "optim": r["optim"]}
    if r.get("scheduler") is not None:
        out["scheduler"] = r["scheduler"]
    for path, value in NEUTRAL.items():
        *parents, leaf = path.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == value:
            del node[leaf]
    _refuse_code_paths(out, "")
    return out


def _refuse_code_paths(node: Any, path: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("_target_", "_partial_"):
                raise RecipeError(f"{path or 'the recipe'} holds {k}: recipes name what training means by stable "
                                  "names (see mlds/train/recipe.py), not import paths")
            _refuse_code_paths(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _refuse_code_paths(v, f"{path}[{i}]")


def recipe_hash(recipe_: dict) -> str:
    """Short stable hash of a recipe: networks of equal key and hash are the same network."""
    blob = json.dumps(recipe_, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]
