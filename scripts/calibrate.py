"""Summarise a zoo for calibration: one markdown table row per task.

    python scripts/calibrate.py --root outputs/calib/ds3 --dataset ds3

Reads every stored sample's ``meta.json`` under ``<root>/<dataset>`` and prints,
per task: networks, share converged, median epochs (of the converged networks and
of all), median test accuracy (ds2: also the median trigger accuracy), the lowest
test accuracy of a converged network (does the stop threshold imply a correct
network?) and the population wall time summed over the shards (one population
each). A task stored under several recipes gets one row per recipe.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

from mlds.release import format_number, median
from mlds.store import ZooStore, read_shard


def _settings(meta: dict) -> str:
    cfg = meta.get("config", {})
    optim, train, data = cfg.get("optim", {}), cfg.get("train", {}), cfg.get("data", {})
    return (f"lr={optim.get('lr')}, stop_loss={meta.get('stop_loss', train.get('stop_loss'))}, "
            f"max_epochs={train.get('max_epochs')}, batch={train.get('batch_size')}, n_train={data.get('n_train')}")


def collect(root: str, dataset: str) -> dict[tuple[str, str], dict]:
    """Per (task, recipe): the networks' metas and the wall time of each shard's population."""
    groups: dict[tuple[str, str], dict] = defaultdict(lambda: {"metas": {}, "walls": {}})
    for shard in ZooStore(root).shards(dataset):
        for net in read_shard(shard):
            meta = net.meta
            group = groups[(meta["task"], meta.get("recipe", ""))]
            group["metas"][net.key] = meta  # a key stored twice under one recipe counts once
            if meta.get("wall_time_s") is not None:
                group["walls"][shard.name] = float(meta["wall_time_s"])
    return dict(sorted(groups.items()))


def table(dataset: str, groups: dict[tuple[str, str], dict]) -> str:
    trigger = dataset == "ds2"
    tasks = [task for task, _ in groups]
    several = len(tasks) > len(set(tasks))  # some task stored under more than one recipe
    head = ["task", *(["recipe"] if several else []), "networks", "converged", "median epochs (converged)",
            "median epochs (all)", "median test acc", *(["median trigger acc"] if trigger else []),
            "min test acc (converged)", "wall time (s)"]
    rows = [head, ["---"] * len(head)]
    settings = set()
    total = defaultdict(float)
    for (task, recipe), group in groups.items():
        metas = list(group["metas"].values())
        settings.add(_settings(metas[0]))
        conv = [m for m in metas if m["converged"]]
        acc = [m["metrics"]["test"]["acc"] for m in metas]
        conv_acc = [m["metrics"]["test"]["acc"] for m in conv]
        wall = sum(group["walls"].values()) if group["walls"] else None
        pop = sorted({m.get("population_size") for m in metas if m.get("population_size")})
        total["networks"] += len(metas)
        total["converged"] += len(conv)
        total["wall"] += wall or 0.0
        row = [task, *([recipe] if several else []), str(len(metas)),
               f"{len(conv) / len(metas):.0%} ({len(conv)})",
               format_number(median([m["epochs"] for m in conv]), 1), format_number(median([m["epochs"] for m in metas]), 1),
               format_number(median(acc))]
        if trigger:
            row.append(format_number(median([m["metrics"]["test_trigger"]["acc"] for m in metas
                                     if "test_trigger" in m["metrics"]])))
        row += [format_number(min(conv_acc) if conv_acc else None),
                format_number(wall, 0) + (f" (populations of {','.join(map(str, pop))})" if wall is not None and pop else "")]
        rows.append(row)
    lines = [f"{dataset}: " + "; ".join(sorted(settings)), ""]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    n = int(total["networks"])
    lines += ["", f"total: {n} networks, {int(total['converged'])} converged "
                  f"({total['converged'] / max(n, 1):.0%}), population wall time {total['wall']:.0f} s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="zoo root (zoo.root of the runs)")
    parser.add_argument("--dataset", required=True, help="ds1 | ds2 | ds3 | ...")
    args = parser.parse_args(argv)
    groups = collect(args.root, args.dataset)
    if not groups:
        print(f"no stored networks of {args.dataset} under {args.root}")
        return 1
    print(table(args.dataset, groups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
