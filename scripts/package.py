"""Build and verify release packages MLDS-<DS>-<N>: exactly N networks per task (the lowest seeds).

    python scripts/package.py build ds1 100                  # -> outputs/releases/MLDS-DS1-100
    python scripts/package.py build MLDS-DS1-100 --root /data/zoo --out /data/releases
    python scripts/package.py verify outputs/releases/MLDS-DS1-100

A package holds repacked WebDataset shards (samples byte for byte as stored),
manifest.json with a SHA-256 per shard, SHA256SUMS and a generated README.md
dataset card. It is built in a hidden folder and renamed into place when
complete. Corrupt shards of the store are never used: a corrupt shard of the
dataset stops the build (its networks would be replaced by other seeds) unless
--skip-corrupt, and then manifest.json lists the skipped shards. Exit status: 0
on success, 1 when the build is refused or fails (one "error:" line, and
nothing of the unfinished package is kept) or verification finds a problem, 2
on a usage error.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mlds.datasets import DATASETS, UnknownDatasetError, dataset_info
from mlds.zoo.store import CorruptShardError
from mlds.zoo.release import DEFAULT_CITATION, DEFAULT_LICENSE, DEFAULT_OUT, ReleaseError, build_package, verify_package


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build MLDS-<DS>-<N> from a zoo store",
                       description="Build MLDS-<DS>-<N>: exactly N networks per task, the lowest seeds stored. "
                       "Sizes: " + "; ".join(f"{d.name}: {', '.join(map(str, d.sizes))}" for d in DATASETS.values()))
    b.add_argument("release", nargs="+", metavar="RELEASE",
                   help="'ds1 100' or 'MLDS-DS1-100'")
    b.add_argument("--root", default="outputs/zoo", help="zoo store root (default: %(default)s)")
    b.add_argument("--out", default=DEFAULT_OUT, help="folder for packages (default: %(default)s)")
    b.add_argument("--shard-networks", type=int, default=1000, help="networks per shard, at most (default: %(default)s)")
    b.add_argument("--on-conflict", choices=("error", "first"), default="error",
                   help="a key stored in different versions: refuse (default), or take the copy of the first "
                        "shard in path order")
    b.add_argument("--recipe", action="append", metavar="HASH",
                   help="in a task stored under this training recipe, use only its networks (repeatable; "
                        "hashes are listed by scripts/status.py)")
    b.add_argument("--allow-mixed-recipes", action="store_true", help="allow a task to mix training recipes")
    b.add_argument("--skip-corrupt", action="store_true",
                   help="build from the sound shards although some shards of the dataset are corrupt (they are "
                        "listed in manifest.json as skipped_corrupt); default: refuse")
    b.add_argument("--license", default=DEFAULT_LICENSE, help="licence of the package (default: %(default)s)")
    b.add_argument("--citation", default=DEFAULT_CITATION, help="citation text for the card (default: %(default)s)")
    b.add_argument("--force", action="store_true", help="replace an existing package of the same name")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    v = sub.add_parser("verify", help="check a package against its manifest and read every sample")
    v.add_argument("package", help="package folder (holds manifest.json)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.add_argument("--retrain", type=int, default=0, metavar="N",
                   help="also train N networks drawn at random again from their meta.json and compare "
                        "(scripts/reproduce.py)")
    return p.parse_args(argv)


def parse_release(words: list[str]) -> tuple[str, int]:
    if len(words) == 1:
        m = re.fullmatch(r"MLDS-([A-Za-z0-9]+)-(\d+)", words[0], flags=re.IGNORECASE)
        if not m:
            raise ReleaseError(f"expected 'MLDS-<DS>-<N>' or '<ds> <N>', got {words[0]!r}")
        return m.group(1).lower(), int(m.group(2))
    if len(words) == 2:
        if not words[1].isdigit():
            raise ReleaseError(f"the size must be a number of networks per task, got {words[1]!r}")
        return words[0].lower(), int(words[1])
    raise ReleaseError(f"expected 'MLDS-<DS>-<N>' or '<ds> <N>', got {' '.join(words)!r}")


def progress_bar(console: Console, what: str, quiet: bool):
    if quiet:
        return None, None
    bar = Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task(what, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


def build(args, console: Console) -> int:
    try:
        dataset, size = parse_release(args.release)
        info = dataset_info(dataset, size)
    except (ReleaseError, UnknownDatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    bar, callback = progress_bar(console, "packing networks", args.quiet)
    if bar:
        bar.start()
    try:
        path = build_package(args.root, info.name, size, args.out, shard_networks=args.shard_networks,
                             on_conflict=args.on_conflict, allow_mixed_recipes=args.allow_mixed_recipes,
                             recipes=set(args.recipe) if args.recipe else None, license=args.license,
                             citation=args.citation, force=args.force, progress=callback,
                             skip_corrupt=args.skip_corrupt)
    finally:
        if bar:
            bar.stop()
    manifest = json.loads((path / "manifest.json").read_text())
    for skipped in manifest.get("skipped_corrupt", []):
        print(f"skipped corrupt shard {skipped['shard']} (byte offset {skipped['offset']}: {skipped['reason']})")
    print(f"built {path}: {manifest['networks']} networks ({size} per task x {len(manifest['tasks'])} tasks), "
          f"{len(manifest['shards'])} shards, {manifest['bytes'] / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s")
    print(f"verify with: python scripts/package.py verify {path}")
    return 0


def verify(args, console: Console) -> int:
    package = Path(args.package)
    if not package.is_dir():
        raise ReleaseError(f"no package at {package}")
    bar, callback = progress_bar(console, "verifying", args.quiet)
    if bar:
        bar.start()
    try:
        report = verify_package(package, progress=callback)
    finally:
        if bar:
            bar.stop()
    if report.ok:
        print(f"OK {package}: {report.shards} shards match manifest.json, {report.networks} networks read")
        if args.retrain:
            from mlds.train.reproduce import check

            return check(str(package), [], args.retrain, 0, "cpu", None, Console(width=200))
        return 0
    print(f"FAILED {package}: {len(report.problems)} problems ({report.shards} shards, {report.networks} "
          "networks read)")
    for problem in report.problems:
        print(f"  {problem}")
    return 1


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    try:
        return build(args, console) if args.command == "build" else verify(args, console)
    except ReleaseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (CorruptShardError, OSError) as err:  # what build_package does not turn into a ReleaseError itself
        print(f"error: {err}; run python scripts/status.py --verify --quarantine to find and move aside damaged "
              "shards", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
