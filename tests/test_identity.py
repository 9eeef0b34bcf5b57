"""A network's identity: recipes name meaning, not code, and the golden networks pin both.

The golden tests pin, for the default config of ds1, ds2 and ds3, the recipe
hash of one task and the weights of one network trained for a few dozen steps
on the CPU (``tests/golden/<dataset>.safetensors``). When a change alters what
training produces, they fail: bump ``ZOO_VERSION`` (mlds/train/recipe.py), then
regenerate with ``MLDS_REGENERATE_GOLDEN=1 python -m pytest tests/test_identity.py``.
"""
import json
import os

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from mlds.datasets import build_task
from mlds.tasks import machines
from mlds.train import recipe as recipe_module
from mlds.train.job import population_module
from mlds.train.recipe import ZOO_VERSION, recipe, recipe_hash

from conftest import REPO

GOLDEN = REPO / "tests" / "golden"
REGENERATE = os.environ.get("MLDS_REGENERATE_GOLDEN") == "1"
SEED, STEPS = 3, 40
BUMP = ("If this change alters trained networks on purpose, bump ZOO_VERSION in mlds/train/recipe.py, "
        "update the pinned hashes here and regenerate the golden weights with "
        "MLDS_REGENERATE_GOLDEN=1 python -m pytest tests/test_identity.py")
# dataset -> (the task's overrides, the pinned recipe hash of its default config)
PINNED = {
    "ds1": (["dataset=ds1", "machine=parity"], "ee5fb8eab3"),
    "ds2": (["dataset=ds2", "machine=eight_bit"], "25cbfef996"),
    "ds3": (["dataset=ds3", "automaton=7"], "66be3180ed"),
}


def composed(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("train", overrides=list(overrides))


def train_steps(rec: dict, seed: int, steps: int) -> dict[str, torch.Tensor]:
    """Network ``seed`` of ``rec`` after ``steps`` optimizer steps on one CPU thread (the job's default)."""
    module = population_module(rec, build_task(rec), [seed])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(module)
    finally:
        torch.set_num_threads(threads)
    return module.records[0].state_dict


@pytest.mark.parametrize("dataset", sorted(PINNED))
def test_default_recipe_hash_is_pinned(dataset):
    overrides, pinned = PINNED[dataset]
    got = recipe_hash(recipe(composed(*overrides)))
    assert REGENERATE or got == pinned, (
        f"the recipe hash of {dataset} defaults ({' '.join(overrides)}) changed from {pinned} to {got}: every stored "
        f"network of such a config gets a new identity. A new setting whose default keeps the old behaviour "
        f"belongs in NEUTRAL (mlds/train/recipe.py). {BUMP}")


@pytest.mark.parametrize("dataset", sorted(PINNED))
def test_golden_network_reproduces(dataset):
    rec = recipe(composed(*PINNED[dataset][0]))
    weights = train_steps(rec, SEED, STEPS)
    path = GOLDEN / f"{dataset}.safetensors"
    if REGENERATE:
        GOLDEN.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path),
                  metadata={"recipe": recipe_hash(rec), "seed": str(SEED), "steps": str(STEPS),
                            "zoo_version": str(ZOO_VERSION)})
        pytest.skip(f"regenerated {path}")
    reference = load_file(str(path))
    assert weights.keys() == reference.keys()
    worst = max((weights[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= 1e-6, (f"{dataset} network {SEED} after {STEPS} steps differs from {path.name} by {worst:.3g} "
                           f"(tolerance 1e-6). {BUMP}")


def test_recipe_holds_no_code_paths():
    for overrides, _ in PINNED.values():
        text = json.dumps(recipe(composed(*overrides, "scheduler=exponential")))
        assert "_target_" not in text and "mlds." not in text and "torch." not in text, text


def test_moving_code_keeps_the_identity(monkeypatch):
    """The same machine class under another import path: same recipe hash, same data."""
    overrides = PINNED["ds1"][0]
    before = recipe(composed(*overrides))
    built = []
    moved = type("ParityMachine", (machines.ParityMachine,),
                 {"__module__": "elsewhere.machines", "__init__": lambda self: built.append(self)})
    monkeypatch.setitem(machines.MACHINES, "parity", moved)
    after = recipe(composed(*overrides))
    assert after == before and recipe_hash(after) == recipe_hash(before)
    task = build_task(after)
    assert built and torch.equal(task.train.y, build_task(before).train.y)


def test_a_new_setting_at_its_neutral_default_keeps_old_hashes(monkeypatch):
    """A setting added later, at the value that reproduces the old behaviour, leaves hashes alone;
    any other value is a different recipe."""
    old = recipe_hash(recipe(composed("dataset=ds1")))
    monkeypatch.setitem(recipe_module.NEUTRAL, "train.grad_clip", None)
    assert recipe_hash(recipe(composed("dataset=ds1", "+train.grad_clip=null"))) == old
    assert recipe_hash(recipe(composed("dataset=ds1", "+train.grad_clip=1.0"))) != old
    # without a NEUTRAL entry, a new setting changes the identity, and the pinned hashes above say so
    monkeypatch.delitem(recipe_module.NEUTRAL, "train.grad_clip")
    assert recipe_hash(recipe(composed("dataset=ds1", "+train.grad_clip=null"))) != old


def test_zoo_version_is_part_of_the_identity(monkeypatch):
    old = recipe_hash(recipe(composed("dataset=ds1")))
    monkeypatch.setattr(recipe_module, "ZOO_VERSION", ZOO_VERSION + 1)
    assert recipe_hash(recipe(composed("dataset=ds1"))) != old
