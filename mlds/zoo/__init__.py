"""Zoos on disk: the shard store (``store``), reading networks as data (``reader``), release
packages and status (``release``) and the dataset card (``card``). Imports neither Lightning nor Hydra."""
