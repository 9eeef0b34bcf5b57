"""Release sizes, the status of a zoo, and release packages ``MLDS-<DS>-<N>``.

A package holds exactly N networks per task (the N lowest seeds stored),
repacked into new shards (``shards/<dataset>-<task>-<n>.tar``, samples byte for
byte as stored), ``manifest.json`` (counts, seeds, recipes and a SHA-256 per
shard), ``SHA256SUMS`` (for ``sha256sum -c``) and a generated ``README.md``
dataset card. It is built in a hidden folder next to its destination and
renamed into place only when complete. A corrupt shard in the store stops a
build (its networks would silently be replaced by other seeds) unless
``skip_corrupt``, and then the manifest lists what was skipped.
:func:`verify_package` checks a package against its manifest (only relative
shard paths inside the package) and reads every sample, weights checked against
their digests and against the architecture's names and shapes.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jinja2

import mlds
from mlds.datasets import DATASETS, DatasetInfo, dataset_info
from mlds.zoo.store import (META, SNAPSHOTS, WEIGHTS, CorruptShardError, Entry, ZooStore, build_catalog,
                            contained_path, read_raw, read_shard, sha256_file, write_tar)

MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
FORMAT = "mlds-release/1"
DEFAULT_OUT = "outputs/releases"
DEFAULT_LICENSE = "CC-BY-4.0"
DEFAULT_CITATION = "TBD"
SHARD_MTIME = 0  # fixed tar mtime: the same networks always give byte-identical package shards
QUARANTINE_HINT = ("run python scripts/status.py --root {root} --verify --quarantine to move damaged shards aside "
                   "(their networks count as missing; a rerun of the sweep trains them again)")


class ReleaseError(ValueError):
    """A release that cannot be built or checked; the message says why."""


# --------------------------------------------------------------------------- status

@dataclass
class TaskStatus:
    task: str
    stored: int
    converged: int
    recipes: dict[str, int]
    conflicts: int
    sources: dict[str, int] = field(default_factory=dict)  # DS4: networks per image source


@dataclass
class DatasetStatus:
    info: DatasetInfo
    tasks: list[TaskStatus]
    extra_tasks: list[TaskStatus]  # stored tasks that the table does not know

    def done(self, size: int) -> int:
        """Networks that count towards release ``size``: up to ``size`` per task."""
        return sum(min(t.stored, size) for t in self.tasks)

    def target(self, size: int) -> int:
        return size * len(self.info.tasks)

    def complete(self, size: int) -> bool:
        return self.done(size) == self.target(size)

    @property
    def stored(self) -> int:
        return sum(t.stored for t in self.tasks)


@dataclass
class ZooStatus:
    root: Path
    datasets: list[DatasetStatus]
    shards: int
    duplicates: int
    conflicts: dict[str, list[Entry]]
    corrupt: list[CorruptShardError]
    partials: list[Path] = field(default_factory=list)
    links: list[Path] = field(default_factory=list)  # symbolic links in the store: never followed
    failed: list[dict] = field(default_factory=list)  # networks that failed training, not stored since


def zoo_status(root: str | os.PathLike, datasets: list[str] | None = None, verify: bool = False,
               cache: bool = True) -> ZooStatus:
    """Networks stored per dataset and task (corrupt shards are not counted; see ``corrupt``)."""
    store = ZooStore(root)
    names = [dataset_info(d).name for d in datasets] if datasets else list(DATASETS)
    result = ZooStatus(Path(root), [], 0, 0, {}, [], store.partials(), store.links())
    for name in names:
        indexes, corrupt = store.index(name, verify=verify, cache=cache)
        catalog = build_catalog(indexes, corrupt)
        stored = {(c.key, c.recipe) for copies in catalog.copies.values() for c in copies}
        result.failed += [f for f in store.failures(name) if (f["key"], f.get("recipe")) not in stored]
        result.shards += len(indexes)
        result.duplicates += catalog.duplicates
        result.conflicts.update(catalog.conflicts)
        result.corrupt.extend(corrupt)
        info = DATASETS[name]

        def task_status(task: str) -> TaskStatus:
            nets = catalog.networks.get((name, task), {})
            return TaskStatus(task, len(nets), sum(e.converged for e in nets.values()),
                              catalog.recipes(name, task),
                              sum(e.key in catalog.conflicts for e in nets.values()),
                              dict(Counter(e.source for e in nets.values() if e.source)))

        known = [task_status(t) for t in info.tasks]
        extra = [task_status(t) for t in catalog.tasks(name) if t not in info.tasks]
        result.datasets.append(DatasetStatus(info, known, extra))
    return result


# --------------------------------------------------------------------------- packages

def select_release(root: str | os.PathLike, dataset: str, size: int, on_conflict: str = "error",
                   allow_mixed_recipes: bool = False, recipes: set[str] | None = None, skip_corrupt: bool = False
                   ) -> tuple[DatasetInfo, dict[str, list[Entry]], list[CorruptShardError]]:
    """The networks of ``MLDS-<dataset>-<size>``: per task (table order) the ``size`` lowest seeds stored.

    Corrupt shards are never used: a corrupt shard of the dataset stops the
    selection (its networks would silently be replaced by higher seeds) unless
    ``skip_corrupt``. ``recipes``: in a task stored under one of
    them, only networks of those recipes count (recipe hashes differ per task).
    Raises :class:`ReleaseError` when a task has
    fewer than ``size`` networks (saying how many are missing), when a chosen
    key is stored in different versions (unless ``on_conflict='first'``), or
    when a task mixes training recipes (unless ``allow_mixed_recipes``)."""
    info = dataset_info(dataset, size)
    size = int(size)
    if on_conflict not in ("error", "first"):
        raise ReleaseError(f"on_conflict must be 'error' or 'first', got {on_conflict!r}")
    if not Path(root).is_dir():
        raise ReleaseError(f"no zoo store at {root}")
    indexes, corrupt = ZooStore(root).index(info.name)
    if corrupt and not skip_corrupt:
        listing = "\n".join(f"  {err}" for err in corrupt[:20])
        more = f"\n  ... and {len(corrupt) - 20} more" if len(corrupt) > 20 else ""
        raise ReleaseError(f"{len(corrupt)} corrupt shard(s) of {info.name} in {root}; their networks would be "
                           f"replaced by other seeds:\n{listing}{more}\n" + QUARANTINE_HINT.format(root=root)
                           + ", or pass --skip-corrupt to build from the sound shards (the manifest lists the "
                           "skipped ones)")
    if recipes:  # per task: only the chosen recipes, where the task has any of them
        present: dict[str, set[str]] = {}
        for index in indexes:
            for e in index.entries:
                present.setdefault(e.task, set()).add(e.recipe)
        recipes = set().union(*[(r & set(recipes)) or r for r in present.values()])
    catalog = build_catalog(indexes, corrupt, recipes or None)
    short, chosen = [], {}
    for task in info.tasks:
        nets = catalog.networks.get((info.name, task), {})
        if len(nets) < size:
            short.append((task, len(nets)))
        chosen[task] = [nets[s] for s in sorted(nets)[:size]]
    if short:
        missing = sum(size - n for _, n in short)
        lines = "\n".join(f"  {task}: {n}/{size} stored, {size - n} missing" for task, n in short)
        bad = f"\n({len(corrupt)} corrupt shard(s) not counted: run scripts/status.py)" if corrupt else ""
        raise ReleaseError(f"{info.release(size)} needs {size} networks for each of {len(info.tasks)} tasks; "
                           f"{missing} networks are missing in {root}:\n{lines}{bad}")
    if on_conflict == "error":
        conflicted = [e.key for nets in chosen.values() for e in nets if e.key in catalog.conflicts]
        if conflicted:
            detail = "\n".join(f"  {k}: " + ", ".join(f"{Path(c.shard).name} (recipe {c.recipe}, "
                                                      f"weights {c.weights_sha256[:12]})"
                                                      for c in catalog.conflicts[k]) for k in conflicted[:10])
            raise ReleaseError(f"{len(conflicted)} networks are stored in different versions:\n{detail}\n"
                               "move the unwanted shards out of the store, or pass --on-conflict first")
    if not allow_mixed_recipes:
        mixed = {t: Counter(e.recipe for e in nets) for t, nets in chosen.items()
                 if len({e.recipe for e in nets}) > 1}
        if mixed:
            detail = "\n".join(f"  {t}: " + ", ".join(f"{r} x{n}" for r, n in c.items()) for t, c in mixed.items())
            raise ReleaseError(f"tasks mix training recipes:\n{detail}\n"
                               "choose one with --recipe, or pass --allow-mixed-recipes")
    return info, chosen, corrupt


def build_package(root: str | os.PathLike, dataset: str, size: int, out: str | os.PathLike = DEFAULT_OUT, *,
                  shard_networks: int = 1000, on_conflict: str = "error", allow_mixed_recipes: bool = False,
                  recipes: set[str] | None = None, license: str = DEFAULT_LICENSE, citation: str = DEFAULT_CITATION,
                  force: bool = False, progress: Callable[[int, int], None] | None = None,
                  skip_corrupt: bool = False) -> Path:
    """Build ``<out>/MLDS-<DS>-<N>`` from the zoo at ``root``; returns its folder.

    Raises :class:`ReleaseError` for anything that stops the build (a corrupt shard, found before or
    while reading; a full disk or another OS error); nothing of an unfinished package is left."""
    if shard_networks < 1:
        raise ReleaseError("shard_networks must be positive")
    info, chosen, corrupt = select_release(root, dataset, size, on_conflict, allow_mixed_recipes, recipes,
                                           skip_corrupt)
    name = info.release(size)
    out = Path(out)
    final = out / name
    if final.exists() and not force:
        raise ReleaseError(f"{final} exists; pass --force to rebuild it")
    work = out / f".{name}.{uuid.uuid4().hex[:8]}.partial"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (work / "shards").mkdir(parents=True)
    except OSError as err:
        raise ReleaseError(f"cannot create the package in {out}: {err}") from None
    try:
        total = sum(len(v) for v in chosen.values())
        done, shards, metas = 0, [], {}
        for task, entries in chosen.items():
            for n, start in enumerate(range(0, len(entries), shard_networks)):
                part = entries[start:start + shard_networks]
                rel = f"shards/{info.name}-{task}-{n:06d}.tar"
                samples = []
                for entry in part:
                    try:
                        weights, meta_bytes, snapshots = read_raw(entry, snapshots=True)
                    except OSError as err:
                        raise CorruptShardError(entry.shard, 0, f"cannot read: {err}") from None
                    if task not in metas:
                        metas[task] = json.loads(meta_bytes)
                    samples.append({"__key__": entry.key, WEIGHTS: weights, META: meta_bytes,
                                    **({SNAPSHOTS: snapshots} if snapshots is not None else {})})
                write_tar(work / rel, samples, mtime=SHARD_MTIME)
                shards.append({"path": rel, "task": task, "networks": len(part), "first": part[0].key,
                               "last": part[-1].key, "bytes": (work / rel).stat().st_size,
                               "sha256": sha256_file(work / rel)})
                done += len(part)
                if progress:
                    progress(done, total)
        manifest = _manifest(info, int(size), chosen, shards, metas, license, citation, root)
        manifest["skipped_corrupt"] = [{"shard": _relative(err.path, root), "offset": err.offset,
                                        "reason": err.reason} for err in corrupt]
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        (work / CHECKSUMS).write_text("".join(f"{s['sha256']}  {s['path']}\n" for s in shards))
        (work / "README.md").write_text(dataset_card(manifest, chosen, metas))
        old = None
        if final.exists():
            old = out / f".{name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(final, old)
        os.replace(work, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(err, CorruptShardError):
            raise ReleaseError(f"a shard of the store is damaged: {err}\n" + QUARANTINE_HINT.format(root=root)
                               + "; then build again") from None
        if isinstance(err, OSError):
            raise ReleaseError(f"cannot build {final}: {err}; nothing of the unfinished package was kept") from None
        raise
    return final


def _relative(path: str, root) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _summary(entries: list[Entry]) -> dict:
    """Summary metrics of one task's networks (medians over networks)."""
    out = {"networks": len(entries), "converged": sum(e.converged for e in entries),
           "seeds": [entries[0].seed, entries[-1].seed] if entries else None,
           "contiguous_seeds": bool(entries) and entries[-1].seed - entries[0].seed + 1 == len(entries),
           "median_epochs": median([e.epochs for e in entries]),
           "median_epochs_converged": median([e.epochs for e in entries if e.converged])}
    splits = sorted({s for e in entries for s in e.metrics})
    out["metrics"] = {s: {"median_acc": median([e.metrics.get(s, {}).get("acc") for e in entries]),
                          "min_acc": min((e.metrics[s]["acc"] for e in entries if s in e.metrics), default=None),
                          "median_loss": median([e.metrics.get(s, {}).get("loss") for e in entries])}
                      for s in splits}
    return out


def _manifest(info: DatasetInfo, size: int, chosen: dict[str, list[Entry]], shards: list[dict], metas: dict,
              license: str, citation: str, root) -> dict:
    first = next(iter(metas.values()))
    tasks = {}
    for task, entries in chosen.items():
        tasks[task] = {**_summary(entries), "recipes": dict(Counter(e.recipe for e in entries)),
                       "shards": [s["path"] for s in shards if s["task"] == task]}
    return {
        "format": FORMAT, "name": info.release(size), "dataset": info.name, "title": info.title,
        "networks_per_task": size, "networks": sum(len(v) for v in chosen.values()),
        "tasks": tasks, "task_order": list(chosen),
        "architecture": first.get("architecture"),
        "shards": shards, "bytes": sum(s["bytes"] for s in shards),
        "license": license, "citation": citation,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "created_by": f"mlds {mlds.__version__}", "source_root": str(Path(root).resolve()),
        "code_revisions": sorted({m.get("code_revision", "unknown") for m in metas.values()}),
        "snapshot_epochs": sorted({e for entries in chosen.values() for x in entries for e in x.snapshot_epochs}),
    }


def median(values) -> float | None:
    """Median of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def format_number(value, digits: int = 3) -> str:
    """A table cell: ``–`` for None, floats to ``digits`` places unless whole."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if not value.is_integer() else f"{value:g}"
    return str(value)


def _protocol(metas: dict) -> list[dict]:
    """Training settings (``label``, ``value``); ``differs`` where a setting differs between tasks."""
    def get(meta, *path):
        node = meta.get("config", {})
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        return node

    fields = [
        ("optimizer", ("optim", "name")), ("learning rate", ("optim", "lr")),
        ("learning-rate schedule", ("scheduler",)),
        ("batch size", ("train", "batch_size")), ("max epochs", ("train", "max_epochs")),
        ("stop when validation loss is below", ("train", "stop_loss")),
        ("training / validation / test sequences", None), ("sequence length", ("data", "seq_len")),
        ("WRITE probability", ("data", "write_prob")), ("poisoned share of training sequences",
                                                         ("data", "poison_fraction")),
        ("trigger", ("task", "trigger", "commands")), ("automaton states", ("data", "n_states")),
        ("image source", ("data", "source")), ("poisoned share of training images", ("task", "trojan", "poison_fraction")),
        ("trigger drawn per network from its seed", ("task", "trojan", "randomize")),
        ("data_seed (training set shared by all networks of a task)", ("data_seed",)),
    ]
    settings = []
    for label, path in fields:
        if path is None:
            values = {(get(m, "data", "n_train"), get(m, "data", "n_val"), get(m, "data", "n_test"))
                      for m in metas.values()}
            values = {" / ".join(map(str, v)) for v in values if any(x is not None for x in v)}
        else:
            values = {json.dumps(get(m, *path)) for m in metas.values() if get(m, *path) is not None}
            values = {v.strip('"') for v in values}
        if values:
            differs = len(values) > 1
            settings.append({"label": label, "value": None if differs else values.pop(), "differs": differs})
    return settings


def _size_category(networks: int) -> str:
    """The Hugging Face ``size_categories`` tier of a number of networks."""
    for limit, tier in ((1000, "n<1K"), (10000, "1K<n<10K"), (100000, "10K<n<100K"), (1000000, "100K<n<1M")):
        if networks < limit:
            return tier
    return "n>1M"


@functools.cache
def _templates() -> jinja2.Environment:
    """The card templates (``mlds/zoo/templates``); Markdown, so nothing is escaped."""
    return jinja2.Environment(loader=jinja2.PackageLoader("mlds.zoo", "templates"), autoescape=False,
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)


def dataset_card(manifest: dict, chosen: dict[str, list[Entry]], metas: dict) -> str:
    """The generated README.md of a package (text and layout: ``templates/dataset_card.md.j2``)."""
    info = DATASETS[manifest["dataset"]]
    arch = manifest.get("architecture") or {}
    tasks = manifest["tasks"]
    splits = [s for s in ("test", "test_trigger") if any(s in t["metrics"] for t in tasks.values())]
    rows = []
    for task, t in tasks.items():
        rows.append({
            "task": task, "networks": f"{t['networks']:,}", "first_seed": t["seeds"][0], "last_seed": t["seeds"][1],
            "contiguous": t["contiguous_seeds"], "converged": f"{t['converged']:,}",
            "converged_percent": f"{100 * t['converged'] / t['networks']:.0f}",
            "median_epochs": format_number(t["median_epochs"], 1),
            "accuracies": [(format_number(t["metrics"].get(s, {}).get("median_acc")),
                            format_number(t["metrics"].get(s, {}).get("min_acc"))) for s in splits],
            "median_test_loss": format_number(t["metrics"].get("test", {}).get("median_loss"), 4)})
    converged = sum(t["converged"] for t in tasks.values())
    layout = []
    try:
        from mlds.nets.registry import build
        layout = [(k, list(v.shape)) for k, v in build(arch).state_dict().items()]
    except Exception:  # an architecture this version cannot build: the card still says what it is
        pass
    return _templates().get_template("dataset_card.md.j2").render(
        name=manifest["name"], license=manifest["license"], license_id=manifest["license"].lower(),
        size_category=_size_category(manifest["networks"]),
        dataset=info.name.upper(), title=info.title, description=info.description,
        networks=f"{manifest['networks']:,}", size=f"{manifest['networks_per_task']:,}", n_tasks=len(tasks),
        n_shards=len(manifest["shards"]), megabytes=f"{manifest['bytes'] / 1e6:,.1f}",
        manifest_file=MANIFEST, checksums_file=CHECKSUMS,
        splits=splits, rows=rows, converged=f"{converged:,}",
        converged_percent=f"{100 * converged / max(manifest['networks'], 1):.1f}",
        arch={"name": arch.get("name", info.network), "network": info.network,
              "params": f"{arch.get('param_count', info.params):,}",
              "cell": str(arch.get("cell") or "").upper(), "input_size": arch.get("input_size"),
              "hidden_size": arch.get("hidden_size"), "num_layers": arch.get("num_layers"),
              "linear_sizes": [arch.get("hidden_size"), *arch.get("head_sizes", []), arch.get("output_size")]
              if arch.get("cell") else []},
        layout=layout, protocol=_protocol(metas),
        recipes=sorted({r for t in tasks.values() for r in t["recipes"]}),
        code_revisions=manifest["code_revisions"], first_task=next(iter(tasks)),
        snapshot_epochs=manifest.get("snapshot_epochs") or [],
        citation=manifest["citation"], created_by=manifest["created_by"], created=manifest["created"])


def manifest_problem(manifest) -> str | None:
    """What makes a parsed ``manifest.json`` unusable (missing keys, wrong types), or None."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(manifest, dict):
        return f"not a JSON object but a {type(manifest).__name__}"
    if manifest.get("format") != FORMAT:
        return f"unknown manifest format {manifest.get('format')!r}"
    for key, ok, what in (("dataset", lambda v: isinstance(v, str), "a string"),
                          ("networks_per_task", is_int, "an integer"),
                          ("shards", lambda v: isinstance(v, list), "a list"),
                          ("tasks", lambda v: isinstance(v, dict), "an object")):
        if key not in manifest:
            return f"lacks {key!r}"
        if not ok(manifest[key]):
            return f"{key!r} is not {what}"
    fields = {"path": str, "task": str, "networks": int, "first": str, "last": str, "bytes": int, "sha256": str}
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            return f"shards[{i}] is not an object"
        for key, kind in fields.items():
            if key not in shard:
                return f"shards[{i}] lacks {key!r}"
            if not isinstance(shard[key], kind) or isinstance(shard[key], bool):
                return f"shards[{i}].{key} is not {'an integer' if kind is int else 'a string'}"
    for task, t in manifest["tasks"].items():
        if not isinstance(t, dict):
            return f"tasks.{task} is not an object"
        if not is_int(t.get("networks")):
            return f"tasks.{task}.networks is not an integer"
        seeds = t.get("seeds")
        if seeds is not None and not (isinstance(seeds, list) and len(seeds) == 2 and all(map(is_int, seeds))):
            return f"tasks.{task}.seeds is not a [first, last] pair of integers"
    return None


def weights_misfit(weights: dict, architecture, cache: dict | None = None) -> str | None:
    """How a network's weights fail to fit its ``meta.json`` architecture (names and shapes of the
    plain module's state dict), or None. The module is built on the meta device: no memory is
    allocated, whatever sizes a hostile architecture names."""
    if not isinstance(architecture, dict):
        return "meta.json has no architecture"
    tag = json.dumps(architecture, sort_keys=True, default=str)
    cache = {} if cache is None else cache
    if tag not in cache:
        try:
            import torch

            from mlds.nets.registry import build
            with torch.device("meta"):
                cache[tag] = {k: tuple(v.shape) for k, v in build(architecture).state_dict().items()}
        except Exception as err:  # an architecture this version cannot build
            cache[tag] = f"its architecture cannot be built ({type(err).__name__}: {str(err)[:200]})"
    layout = cache[tag]
    if isinstance(layout, str):
        return layout
    if set(weights) != set(layout):
        missing, unexpected = sorted(set(layout) - set(weights)), sorted(set(weights) - set(layout))
        return (f"weights do not fit the architecture {architecture.get('name')!r}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}")
    for name, shape in layout.items():
        if tuple(weights[name].shape) != shape:
            return (f"weights do not fit the architecture {architecture.get('name')!r}: {name} has shape "
                    f"{tuple(weights[name].shape)}, the architecture says {shape}")
    return None


@dataclass
class VerifyReport:
    package: Path
    shards: int = 0
    networks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_package(package: str | os.PathLike, progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check a package against its manifest: every shard present with its size and SHA-256, no
    unlisted shard, and every sample readable (tar structure, meta.json, weights digest), with the
    keys, counts and seeds the manifest states."""
    package = Path(package)
    report = VerifyReport(package)
    try:
        manifest = json.loads((package / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as err:
        report.problems.append(f"cannot read {package / MANIFEST}: {type(err).__name__}: {str(err)[:200]}")
        return report
    problem = manifest_problem(manifest)
    if problem:
        report.problems.append(f"{MANIFEST}: {problem}")
        return report
    listed = {s["path"] for s in manifest["shards"]}
    for extra in sorted(p.relative_to(package).as_posix() for p in package.rglob("*.tar")):
        if extra not in listed:
            report.problems.append(f"{extra}: shard not listed in the manifest")
    seen: set[str] = set()
    per_task: dict[str, list[int]] = {}
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    done = 0
    layouts: dict[str, dict | str] = {}
    for shard in manifest["shards"]:
        report.shards += 1
        done += shard["bytes"]
        try:
            path = contained_path(package, shard["path"])
        except ValueError as err:
            report.problems.append(f"{MANIFEST}: shard path {err} (only relative paths inside the package)")
            continue
        if not path.is_file():
            report.problems.append(f"{shard['path']}: missing")
            continue
        try:
            if path.stat().st_size != shard["bytes"]:
                report.problems.append(f"{shard['path']}: {path.stat().st_size} bytes, the manifest says "
                                       f"{shard['bytes']}")
            if sha256_file(path) != shard["sha256"]:
                report.problems.append(f"{shard['path']}: SHA-256 differs from the manifest")
        except OSError as err:
            report.problems.append(f"{shard['path']}: cannot read: {err}")
            continue
        keys = []
        try:
            for net in read_shard(path):
                keys.append(net.key)
                if net.meta.get("dataset") != manifest["dataset"] or net.meta.get("task") != shard["task"]:
                    report.problems.append(f"{shard['path']}: {net.key} is not a {manifest['dataset']}/"
                                           f"{shard['task']} network")
                if net.key in seen:
                    report.problems.append(f"{shard['path']}: {net.key} occurs twice in the package")
                misfit = weights_misfit(net.weights, net.meta.get("architecture"), layouts)
                if misfit:
                    report.problems.append(f"{shard['path']}: {net.key}: {misfit}")
                seen.add(net.key)
                per_task.setdefault(net.meta.get("task"), []).append(int(net.meta.get("seed", -1)))
        except (CorruptShardError, OSError) as err:
            report.problems.append(str(err))
        report.networks += len(keys)
        if len(keys) != shard["networks"] or (keys and (keys[0] != shard["first"] or keys[-1] != shard["last"])):
            report.problems.append(f"{shard['path']}: holds {len(keys)} networks "
                                   f"({keys[0] if keys else '-'}..{keys[-1] if keys else '-'}), the manifest says "
                                   f"{shard['networks']} ({shard['first']}..{shard['last']})")
        if progress:
            progress(done, total_bytes)
    size = manifest["networks_per_task"]
    for task, t in manifest["tasks"].items():
        seeds = sorted(per_task.get(task, []))
        if len(seeds) != size or t["networks"] != size:
            report.problems.append(f"task {task}: {len(seeds)} networks read, the release needs exactly {size}")
        elif [seeds[0], seeds[-1]] != t["seeds"]:
            report.problems.append(f"task {task}: seeds {seeds[0]}..{seeds[-1]}, the manifest says {t['seeds']}")
    for task in set(per_task) - set(manifest["tasks"]):
        report.problems.append(f"task {task}: not in the manifest")
    return report
