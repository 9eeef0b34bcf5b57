"""How far the zoo is: per dataset and release size, ``Complete`` or done/target networks.

    python scripts/status.py                      # every dataset of outputs/zoo
    python scripts/status.py --root /data/zoo --dataset ds1 --markdown
    python scripts/status.py --verify             # also read every weights file and check its SHA-256
    python scripts/status.py --sweep outputs/sweeps/2026-11-30/10-31-27 --watch   # live progress of a sweep

Networks of corrupt shards are not counted (the shards are listed; --quarantine
moves them to <root>/.quarantine/ so the next sweep trains their networks
again); a resumed sweep counts exactly the networks counted here. Symbolic links
inside the store are listed, never followed. Networks that failed training
(non-finite weights) and are not stored are listed. Exit status: 0, 1 when a
corrupt shard or a conflicting key was found, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mlds.train.progress import SweepProgress, format_seconds
from mlds.datasets import DATASETS, UnknownDatasetError
from mlds.zoo.release import DEFAULT_OUT, MANIFEST, ReleaseError, ZooStatus, zoo_status
from mlds.zoo.store import ZooStore


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="outputs/zoo", help="zoo store root (default: %(default)s)")
    p.add_argument("--dataset", action="append", choices=sorted(DATASETS), metavar="DS",
                   help=f"only this dataset (repeatable; one of {', '.join(DATASETS)}); default: all")
    p.add_argument("--releases", default=DEFAULT_OUT, help="folder of built packages (default: %(default)s)")
    p.add_argument("--tasks", choices=("stored", "all", "none"), default="stored",
                   help="per-task table rows: tasks with networks (default), all tasks, or none")
    p.add_argument("--verify", action="store_true", help="read every weights file and check its SHA-256 (slow)")
    p.add_argument("--no-cache", action="store_true", help="do not use or write <root>/.index")
    p.add_argument("--markdown", action="store_true", help="print markdown tables (as in the announcement)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--quarantine", action="store_true",
                   help="move corrupt shards to <root>/.quarantine/ (their networks count as missing)")
    p.add_argument("--remove-partials", type=float, metavar="HOURS", default=None,
                   help="delete .partial files (left by killed writers) untouched for HOURS")
    p.add_argument("--sweep", metavar="DIR", help="show the progress of a sweep (its Hydra sweep folder) instead")
    p.add_argument("--watch", action="store_true", help="with --sweep: refresh until the sweep is done")
    return p.parse_args(argv)


def cell(ds, size: int) -> str:
    return "Complete" if ds.complete(size) else f"{ds.done(size)}/{ds.target(size)}"


def package_cell(releases: Path, ds, size: int) -> str:
    folder = releases / ds.info.release(size)
    return str(folder) if (folder / MANIFEST).is_file() else "---"


def markdown(status: ZooStatus, args) -> str:
    out = []
    for ds in status.datasets:
        names = [ds.info.release(n) for n in ds.info.sizes]
        out += [f"**MLDS-{ds.info.name.upper()}** ({ds.info.title}: {len(ds.info.tasks)} tasks, "
                f"{ds.info.params:,} parameters per network)", "",
                "Status | " + " | ".join(names) + " |", "---|" + "---|" * len(names),
                "Computation | " + " | ".join(cell(ds, n) for n in ds.info.sizes) + " |",
                "Package | " + " | ".join(package_cell(Path(args.releases), ds, n) for n in ds.info.sizes) + " |", ""]
        rows = task_rows(ds, args.tasks)
        if rows:
            out += ["| task | stored | converged | recipes | conflicts |", "|---|---:|---:|---|---:|"]
            out += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in rows] + [""]
    return "\n".join(out + footer(status))


def task_rows(ds, which: str) -> list[list[str]]:
    if which == "none":
        return []
    rows = []
    for t in [*ds.tasks, *ds.extra_tasks]:
        if which == "stored" and not t.stored:
            continue
        share = f" ({100 * t.converged / t.stored:.0f}%)" if t.stored else ""
        note = "" if t in ds.tasks else " (not a release task)"
        rows.append([t.task + note, str(t.stored), f"{t.converged}{share}",
                     (", ".join(f"{r} x{n}" for r, n in t.recipes.items()) or "-")
                     + (f" ({', '.join(t.sources)})" if t.sources else ""), str(t.conflicts)])
    return rows


def footer(status: ZooStatus) -> list[str]:
    lines = [f"{status.shards} sound shards in {status.root}; {status.duplicates} duplicate copies kept once."]
    if status.conflicts:
        lines.append(f"{len(status.conflicts)} keys are stored in different versions (counted once; packaging "
                     "refuses them until resolved):")
        for key, copies in list(status.conflicts.items())[:20]:
            lines.append(f"  {key}: " + ", ".join(f"{Path(c.shard).name} (recipe {c.recipe}, weights "
                                                  f"{c.weights_sha256[:12]})" for c in copies))
    if status.corrupt:
        lines.append(f"{len(status.corrupt)} corrupt shards, NOT counted (scripts/status.py --quarantine moves "
                     "them aside):")
        lines += [f"  {err}" for err in status.corrupt]
    if status.partials:
        lines.append(f"{len(status.partials)} unfinished .partial files (a writer still running, or killed; never "
                     "read; --remove-partials HOURS deletes old ones).")
    if status.failed:
        lines.append(f"{len(status.failed)} networks failed training and are NOT stored (a rerun trains them "
                     f"again; records in {status.root}/.failed):")
        lines += [f"  {f['key']} (recipe {f.get('recipe')}): {f.get('reason')}" for f in status.failed[:20]]
        if len(status.failed) > 20:
            lines.append(f"  ... and {len(status.failed) - 20} more")
    if status.links:
        lines.append(f"{len(status.links)} symbolic links in the store, ignored (links are never followed):")
        lines += [f"  {p}" for p in status.links[:20]]
    return lines


def render(status: ZooStatus, args, console: Console) -> None:
    for ds in status.datasets:
        title = (f"MLDS-{ds.info.name.upper()} · {ds.info.title} · {len(ds.info.tasks)} tasks · "
                 f"{ds.info.params:,} parameters per network")
        console.print(title, style="bold", highlight=False)
        table = Table()
        table.add_column("Status")
        for n in ds.info.sizes:
            table.add_column(ds.info.release(n), justify="right")
        table.add_row("Computation", *[cell(ds, n) for n in ds.info.sizes])
        table.add_row("Package", *["built" if package_cell(Path(args.releases), ds, n) != "---" else "---"
                                   for n in ds.info.sizes])
        console.print(table)
        rows = task_rows(ds, args.tasks)
        if rows:
            tasks = Table(show_edge=False, box=None, padding=(0, 2))
            for name, justify in (("task", "left"), ("stored", "right"), ("converged", "right"),
                                  ("recipes", "left"), ("conflicts", "right")):
                tasks.add_column(name, justify=justify)
            for r in rows:
                tasks.add_row(*r)
            console.print(tasks)
        elif not ds.stored:
            console.print("  no networks stored")
        console.print()
    for line in footer(status):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def as_json(status: ZooStatus) -> dict:
    return {"root": str(status.root), "shards": status.shards, "duplicates": status.duplicates,
            "conflicts": sorted(status.conflicts), "corrupt": [str(e) for e in status.corrupt],
            "partials": [str(p) for p in status.partials], "links": [str(p) for p in status.links],
            "failed": [{k: f.get(k) for k in ("key", "recipe", "reason")} for f in status.failed],
            "datasets": {ds.info.name: {
                "releases": {ds.info.release(n): {"done": ds.done(n), "target": ds.target(n)} for n in ds.info.sizes},
                "tasks": {t.task: {"stored": t.stored, "converged": t.converged, "recipes": t.recipes,
                                   "sources": t.sources,
                                   "conflicts": t.conflicts} for t in [*ds.tasks, *ds.extra_tasks] if t.stored},
            } for ds in status.datasets}}


def show_sweep(folder: str, watch: bool, console: Console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    progress = SweepProgress.open(folder)
    if progress is None:
        console.print(f"no sweep progress in {folder} (a sweep of the population sweeper writes progress.json there)")
        return 1
    columns = [TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("networks"),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA {task.fields[eta]}")]
    with Progress(*columns, console=console, auto_refresh=False, transient=False) as bar:
        task = bar.add_task("sweep", total=progress.total, rate="", eta="")
        while True:
            s = progress.snapshot()
            bar.update(task, completed=s.done, rate=f"{s.rate:.2f}/s" if s.rate else "-",
                       eta=format_seconds(s.eta))
            bar.refresh()
            if not watch or s.done >= s.total:
                break
            time.sleep(2)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    if args.sweep:
        return show_sweep(args.sweep, args.watch, console)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: no zoo store at {root} (train one with: python train.py -m 'seed=range(0,100)')",
              file=sys.stderr)
        return 2
    store = ZooStore(root)
    try:
        if args.remove_partials is not None:
            for p in store.remove_partials(args.remove_partials * 3600):
                print(f"removed {p}")
        status = zoo_status(root, args.dataset, verify=args.verify, cache=not args.no_cache)
    except (ReleaseError, UnknownDatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot read the zoo store {root}: {err}", file=sys.stderr)
        return 2
    if args.quarantine:
        for err in status.corrupt:
            try:
                print(f"quarantined {err.path} -> {store.quarantine(err.path)}")
            except (OSError, ValueError) as problem:
                print(f"error: cannot quarantine {err.path}: {problem}", file=sys.stderr)
                return 2
    if args.json:
        print(json.dumps(as_json(status), indent=1))
    elif args.markdown:
        print(markdown(status, args))
    else:
        render(status, args, console)
    return 1 if status.corrupt or status.conflicts else 0


if __name__ == "__main__":
    sys.exit(main())
