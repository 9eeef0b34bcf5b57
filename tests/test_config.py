"""The recipe identity: which settings make a different network."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mlds.train.checks import ConfigError, validate
from mlds.train.recipe import recipe, recipe_hash as _hash


def recipe_hash(cfg):
    return _hash(recipe(cfg))

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def composed(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose("train", overrides=list(overrides))


def test_recipe_ignores_runtime_settings_and_unset_groups():
    base = composed("dataset=ds1")
    assert "scheduler" not in recipe(base)  # no schedule chosen: not part of the recipe
    assert recipe_hash(base) == recipe_hash(composed("dataset=ds1", "train.threads=2", "train.progress=false",
                                                      "population.size=3", "seed=5"))


def test_learning_rate_schedule_is_part_of_the_recipe():
    plain, scheduled = composed("dataset=ds1"), composed("dataset=ds1", "scheduler=exponential")
    assert recipe(scheduled)["scheduler"]["gamma"] == scheduled.scheduler.gamma
    assert recipe_hash(plain) != recipe_hash(scheduled)
    assert recipe_hash(scheduled) != recipe_hash(composed("dataset=ds1", "scheduler=exponential",
                                                          "scheduler.gamma=0.5"))


@pytest.mark.parametrize("gamma", [0, 1.5, -0.1])
def test_impossible_decay_is_refused(gamma):
    with pytest.raises(ConfigError, match="scheduler.gamma"):
        validate(composed("dataset=ds1", "scheduler=exponential", f"scheduler.gamma={gamma}"))
