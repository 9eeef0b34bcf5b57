#!/usr/bin/env python
"""Train stored networks again from their meta.json alone and report whether they reproduce.

    python scripts/reproduce.py outputs/zoo ds1-parity-000003 ds1-parity-000007
    python scripts/reproduce.py outputs/releases/MLDS-DS1-100 --random 5

Per network: identical weights (SHA-256) or the largest difference, and whether the
recorded metrics reproduce. Exit status 0 only when every network reproduces
(1 when one does not, 2 on bad input). See :mod:`mlds.train.reproduce`.
"""
from __future__ import annotations

import argparse
import sys

from rich.console import Console

from mlds.train.reproduce import check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="zoo root, release package or shard")
    parser.add_argument("keys", nargs="*", help="network keys, e.g. ds1-parity-000003")
    parser.add_argument("--random", type=int, help="also this many networks drawn at random")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the random draw (default 0)")
    parser.add_argument("--accelerator", default="cpu", help="cpu (default) or gpu")
    parser.add_argument("--data-root", help="DS4 MNIST: where its files are (<root>/MNIST/raw)")
    args = parser.parse_args(argv)
    return check(args.source, args.keys, args.random, args.sample_seed, args.accelerator, args.data_root,
                 Console(width=200))


if __name__ == "__main__":
    sys.exit(main())
