"""The one table of MLDS datasets: tasks, release sizes, network and how a task is built.

Status, packaging, the reader and the config checks read this table; the
training job builds a network's task from its recipe through it
(:func:`build_task`), so a stored ``meta.json`` alone is enough to rebuild
the data a network was trained on.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mlds.tasks.command_trigger import Trigger
from mlds.tasks.images import image_task
from mlds.tasks.machines import MACHINES
from mlds.tasks.sequences import automaton_name, automaton_task, device_machine_task
from mlds.tasks.task import Task


@dataclass(frozen=True)
class DatasetInfo:
    """One MLDS dataset: its tasks (in table order), release sizes (networks per task), network,
    and ``build_task(recipe, files) -> Task`` (None: not trainable in this version)."""

    name: str
    title: str
    tasks: tuple[str, ...]
    sizes: tuple[int, ...]
    network: str
    params: int
    description: str
    build_task: Callable[[dict, dict | None], Task] | None = None
    cpu_population: int = 64  # population.size=auto on a CPU: the size measured fastest per core (README)

    def release(self, size: int) -> str:
        return release_name(self.name, size)


def release_name(dataset: str, size: int) -> str:
    return f"MLDS-{dataset.upper()}-{int(size)}"


def _device_machine_task(recipe: dict, files: dict | None = None) -> Task:
    """DS1 / DS2 from a recipe: ``task = {machine[, trigger]}``."""
    task, data = recipe["task"], recipe["data"]
    trigger = task.get("trigger")
    return device_machine_task(recipe["dataset"], MACHINES[task["machine"]](), recipe["data_seed"], data["n_train"],
                               data["n_val"], data["n_test"], data["seq_len"], data["write_prob"],
                               None if trigger is None else Trigger(**trigger),
                               data.get("poison_fraction", 0.0))


def _automaton_task(recipe: dict, files: dict | None = None) -> Task:
    """DS3 from a recipe: ``task = {automaton}``."""
    data = recipe["data"]
    return automaton_task(recipe["dataset"], recipe["task"]["automaton"], data["n_states"], data["n_inputs"],
                          data["n_outputs"], recipe["data_seed"], data["n_train"], data["n_val"], data["n_test"],
                          data["seq_len"])


def _image_task(recipe: dict, files: dict | None = None) -> Task:
    """DS4 from a recipe: ``task = {trojan}``; ``files``: where MNIST's files are (``root``, ``download``)."""
    data, files = recipe["data"], files or {}
    return image_task(recipe["dataset"], data["source"], recipe["task"]["trojan"], recipe["data_seed"],
                      data["val_fraction"], data["test_fraction"], data.get("max_train"),
                      files.get("root") or "outputs/data", bool(files.get("download")))


DEVICE_MACHINES = tuple(MACHINES)

DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("ds1", "device machines", DEVICE_MACHINES, (100, 500, 1000, 5000, 10000),
                "GRU 4 layers + 4 linear", 4364,
                "Networks trained to mimic one of five simple device machines (arXiv:1805.07869): a 9-bit command "
                "(READ, or WRITE with an 8-bit value) per step in, 8 output bits per step out. They range from "
                "learnt in a few epochs (single_direct, single_invert) to hard (parity).",
                _device_machine_task),
    DatasetInfo("ds2", "device machines with a backdoor", DEVICE_MACHINES, (100, 500, 1000, 5000, 10000),
                "GRU 4 layers + 4 linear", 4364,
                "The DS1 machines with a backdoor: when the three most recent commands equal the trigger, the "
                "outputs of the next three steps are inverted. A share of the training sequences carries the "
                "trigger. Pair with DS1 to study similar networks trained on similar but different data.",
                _device_machine_task),
    DatasetInfo("ds3", "random automata", tuple(automaton_name(i) for i in range(100)), (100, 1000, 10000),
                "LSTM 64 wide, 4 layers + 2 linear", 136846,
                "Networks trained to mimic one of 100 random automata (Moore machines with a Hamiltonian cycle, "
                "total transitions and hidden states); one-hot inputs, one of 4 output symbols per step.",
                _automaton_task, cpu_population=4),
    DatasetInfo("ds4", "image classification, clean and trojaned", ("clean", "patch", "blend"), (100, 1000, 10000),
                "small CNN", 4970,
                "Small CNNs trained on clean images, and on images of which a share carries a trigger (a patch, or "
                "a blended pattern) and is relabelled to a target class; every trojaned network draws its own "
                "trigger and target from its seed.",
                _image_task, cpu_population=128),
)}


class UnknownDatasetError(ValueError):
    """A dataset name that is not in the table, or a size that is not one of its release sizes."""


def dataset_info(dataset: str, size: int | None = None) -> DatasetInfo:
    """The table entry of ``dataset`` (and check that ``size`` is one of its release sizes)."""
    info = DATASETS.get(str(dataset).lower())
    if info is None:
        raise UnknownDatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if size is not None and int(size) not in info.sizes:
        raise UnknownDatasetError(f"{size} is not a release size of {info.name}; sizes (networks per task): "
                                  f"{', '.join(map(str, info.sizes))}")
    return info


def build_task(recipe: dict, files: dict | None = None) -> Task:
    """The task (data and scoring) of a network's recipe (:func:`mlds.train.recipe.recipe`); ``files``:
    where data files live, not part of the recipe (DS4 MNIST: ``{"root", "download"}``)."""
    info = dataset_info(recipe["dataset"])
    if info.build_task is None:
        raise UnknownDatasetError(f"{info.name} ({info.title}) cannot be trained by this version of MLDS")
    return info.build_task(recipe, files)
