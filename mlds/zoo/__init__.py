"""Zoos on disk: the shard store (``store``), reading networks as data (``reader``), release
packages, status and the dataset card (``release``, ``templates/dataset_card.md.j2``).
Imports neither Lightning nor Hydra."""
