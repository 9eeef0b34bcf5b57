"""Fixed benchmark splits of a zoo: every network is ``train``, ``val`` or ``test`` by its seed alone.

The rule (version 1), so that anyone can reproduce a number without any file::

    u = int(sha256(f"mlds-split-v1-{seed}").hexdigest()[:16], 16) / 2**64
    split = "test" if u < 0.5 else "train" if u < 0.9 else "val"      # 50% / 40% / 10%

The split depends on the seed only, so it is the same for every task and
every dataset: within each task the seeds fall 50 / 40 / 10 (in expectation)
into test / train / val, and networks that share a seed -- which in MLDS means
they share their *initial weights* (``mlds.nets.registry.init_state_dict``),
e.g. ``ds1-parity-000007``, ``ds1-eight_bit-000007`` and ``ds2-parity-000007`` --
are always on the same side. A split that hashed the task or dataset as well
would put the twins of a test network into the training set, where a probe
learns their shared initialisation instead of what the task wrote into the
weights.

``val`` is for model selection (early stopping, hyperparameters); report
numbers on ``test``. Pure Python (``hashlib``): reading a zoo costs no
Lightning, Hydra or scikit-learn.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPLIT_VERSION = 1
SPLITS = ("train", "val", "test")
#: upper ends of the hash intervals, in this order: test [0, 0.5), train [0.5, 0.9), val [0.9, 1)
FRACTIONS = {"test": 0.5, "train": 0.4, "val": 0.1}


def split_value(seed: int) -> float:
    """The seed's position in [0, 1): the first 64 bits of ``sha256("mlds-split-v1-<seed>")``."""
    digest = hashlib.sha256(f"mlds-split-v{SPLIT_VERSION}-{int(seed)}".encode()).hexdigest()
    return int(digest[:16], 16) / 2.0 ** 64


def split_of(seed: int) -> str:
    """``"test"`` (50%), ``"train"`` (40%) or ``"val"`` (10%) for a network seed (see the module docstring)."""
    u = split_value(seed)
    if u < FRACTIONS["test"]:
        return "test"
    if u < FRACTIONS["test"] + FRACTIONS["train"]:
        return "train"
    return "val"


def check_split(split: str | Iterable[str] | None) -> frozenset[str] | None:
    """Normalise a split argument (a name, several names, or None for all); unknown names raise."""
    if split is None:
        return None
    names = frozenset([split] if isinstance(split, str) else split)
    unknown = sorted(names - set(SPLITS))
    if unknown or not names:
        raise ValueError(f"unknown split {', '.join(unknown) or '(none)'}; choose from {', '.join(SPLITS)}")
    return names


def split_seeds(seeds: Iterable[int]) -> dict[str, list[int]]:
    """``{"train": [...], "val": [...], "test": [...]}`` of some seeds (sorted)."""
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for seed in sorted({int(s) for s in seeds}):
        out[split_of(seed)].append(seed)
    return out
