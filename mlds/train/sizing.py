"""``population.size=auto``: as many networks per population as the device holds.

On a CUDA device the memory one network needs in training is measured on a
probe population (a training step with gradients and Adam's two moments, and an
evaluation chunk), and the population fills ``FILL`` of the free memory. On a
CPU, where throughput per core is flat from a few dozen networks on and falls
beyond, it is the dataset's measured choice (``DatasetInfo.cpu_population``).
"""
from __future__ import annotations

import torch

from mlds.datasets import dataset_info
from mlds.nets.registry import population_from_seeds
from mlds.tasks.task import Task

FILL = 0.7  # share of the free device memory a population may take
PROBE = 64  # networks in the probe population


def population_size_for(free_bytes: float, bytes_per_network: float, n_seeds: int, fill: float = FILL) -> int:
    """Networks that fit in ``fill`` of ``free_bytes`` (at least 1, at most ``n_seeds``)."""
    return max(1, min(int(n_seeds), int(fill * free_bytes // max(bytes_per_network, 1.0))))


def bytes_per_network(rec: dict, task: Task, device: torch.device, probe: int = PROBE) -> float:
    """Peak CUDA memory per network of a probe population: the larger of a training step (activations
    and gradients, plus Adam's two moments) and an evaluation chunk of 256 samples."""
    net = population_from_seeds(rec["architecture"], range(probe)).to(device)
    train = task.train.to(device)
    batch = int(rec["train"]["batch_size"])
    idx = torch.randint(len(train), (probe, batch), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    net.training_loss(train.x[idx], train.y[idx], None, task.loss).sum().backward()  # as a training step does
    step = torch.cuda.max_memory_allocated(device) - before
    net.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        net(train.x[:256].unsqueeze(0))
    evaluation = torch.cuda.max_memory_allocated(device) - before
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    del net, train
    torch.cuda.empty_cache()
    return (max(step, evaluation) + 2 * params) / probe


def auto_population_size(rec: dict, task: Task, n_seeds: int, accelerator: str) -> int:
    """The population size of ``population.size=auto`` for this job's device."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        free, _ = torch.cuda.mem_get_info(device)
        return population_size_for(free, bytes_per_network(rec, task, device), n_seeds)
    return min(int(n_seeds), dataset_info(rec["dataset"]).cpu_population)
