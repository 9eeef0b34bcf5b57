"""population.size=auto: from free device memory on a GPU, the dataset's measured size on a CPU."""
import pytest
import torch

from conftest import TINY, compose_train
from mlds.datasets import build_task
from mlds.train.checks import ConfigError, validate
from mlds.train.recipe import recipe
from mlds.train.sizing import auto_population_size, bytes_per_network, population_size_for


def test_population_size_fills_free_memory_within_bounds():
    gib = 2**30
    assert population_size_for(80 * gib, 3 * 2**20, 100_000) == int(0.7 * 80 * gib // (3 * 2**20))  # 19,114
    assert population_size_for(80 * gib, 3 * 2**20, 1000) == 1000  # never more networks than seeds
    assert population_size_for(1 * 2**20, 3 * 2**20, 1000) == 1  # at least one


@pytest.mark.parametrize("dataset, expected", [("ds1", 64), ("ds3", 4), ("ds4", 128)])
def test_auto_on_a_cpu_is_the_datasets_measured_size(dataset, expected):
    rec = recipe(compose_train(f"dataset={dataset}"))
    assert auto_population_size(rec, None, 1000, "cpu") == expected
    assert auto_population_size(rec, None, 3, "cpu") == 3


def test_auto_is_a_valid_size_and_other_words_are_not():
    validate(compose_train("population.size=auto", *TINY))
    with pytest.raises(ConfigError, match="population.size"):
        validate(compose_train("population.size=most", *TINY))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bytes_per_network_on_cuda():
    rec = recipe(compose_train("dataset=ds1", *TINY))
    per = bytes_per_network(rec, build_task(rec), torch.device("cuda"))
    assert 4364 * 4 * 3 < per < 64 * 2**20
    assert auto_population_size(rec, build_task(rec), 10**6, "gpu") > 1000
