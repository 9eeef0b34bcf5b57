"""Summarise a zoo for calibration: one markdown table row per task.

    python scripts/calibrate.py --root outputs/calib/ds3 --dataset ds3

Reads every stored sample's ``meta.json`` under ``<root>/<dataset>`` and prints,
per task: networks, share converged, median epochs (of the converged networks and
of all), median test accuracy (ds2: also the median trigger accuracy), the lowest
test accuracy of a converged network (does the stop threshold imply a correct
network?) and the population wall time summed over the shards (one population
each). A task stored under several recipes gets one row per recipe.

    python scripts/calibrate.py --root outputs/calib/ds3 --dataset ds3 --stop-loss 0.04 --max-epochs 60

replays the stop rule on the recorded per-epoch validation losses: the table the
same runs would give with a looser ``stop_loss`` or fewer ``max_epochs``. This is
exact, because a network's trajectory up to its stop does not depend on the rule
(nor on the other networks of its population); the table then shows validation
accuracies at the replayed stop, since the test split is scored once, at the end.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

from mlds.zoo.release import format_number, median
from mlds.zoo.store import ZooStore, read_shard


def _settings(meta: dict) -> str:
    cfg = meta.get("config", {})
    optim, train, data = cfg.get("optim", {}), cfg.get("train", {}), cfg.get("data", {})
    schedule = cfg.get("scheduler") or {}
    decay = f" x {schedule['gamma']}/epoch" if "gamma" in schedule else ""
    return (f"lr={optim.get('lr')}{decay}, stop_loss={meta.get('stop_loss', train.get('stop_loss'))}, "
            f"max_epochs={train.get('max_epochs')}, batch={train.get('batch_size')}, "
            f"n_train={data.get('n_train', meta.get('task_description', {}).get('n_train'))}"
            + (f", source={data['source']}" if "source" in data else ""))


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


class ReplayError(ValueError):
    """A replayed stop rule that the recorded histories cannot answer."""


def replay(meta: dict, stop_loss: float | None, max_epochs: int | None) -> dict:
    """``meta`` as it would read had the network stopped at the first epoch whose validation
    losses were all below ``stop_loss`` (or at ``max_epochs``); its ``metrics`` are then the
    validation accuracies recorded at that epoch."""
    recorded_stop = float(meta.get("stop_loss", meta["config"]["train"]["stop_loss"]))
    recorded_max = int(meta["config"]["train"]["max_epochs"])
    stop_loss = recorded_stop if stop_loss is None else stop_loss
    max_epochs = recorded_max if max_epochs is None else max_epochs
    if stop_loss < recorded_stop:
        raise ReplayError(f"{meta['task']} seed {meta['seed']} trained with stop_loss {recorded_stop}: "
                          f"a stricter {stop_loss} cannot be replayed")
    if max_epochs > recorded_max:
        raise ReplayError(f"{meta['task']} seed {meta['seed']} trained for at most {recorded_max} epochs: "
                          f"{max_epochs} cannot be replayed")
    history = meta["history"]
    splits = [k[: -len("_loss")] for k in history if k.endswith("_loss") and k != "train_loss"]
    ran = min(max_epochs, len(history["train_loss"]))
    stop = next((e for e in range(ran) if all(history[f"{s}_loss"][e] < stop_loss for s in splits)), None)
    last = ran - 1 if stop is None else stop
    metrics = {split: {"acc": history[f"{split}_acc"][last]} for split in splits}
    return {**meta, "epochs": last + 1, "converged": stop is not None, "stop_loss": stop_loss,
            "metrics": metrics, "config": {**meta["config"], "train": {**meta["config"]["train"], "max_epochs": max_epochs}}}


def table(dataset: str, groups: dict[tuple[str, str], dict], split: str = "test") -> str:
    """The markdown table; accuracies are those of ``split`` (and ``<split>_trigger`` where stored: ds2's
    backdoor accuracy, ds4's attack success rate)."""
    trigger = any(f"{split}_trigger" in m["metrics"] for g in groups.values() for m in g["metas"].values())
    tasks = [task for task, _ in groups]
    several = len(tasks) > len(set(tasks))  # some task stored under more than one recipe
    head = ["task", *(["recipe"] if several else []), "networks", "converged", "median epochs (converged)",
            "median epochs (all)", f"median {split} acc", f"min {split} acc (converged)",
            *([f"median {split}_trigger acc", f"min {split}_trigger acc (converged)"] if trigger else []),
            "wall time (s)"]
    rows = [head, ["---"] * len(head)]
    settings = set()
    total = defaultdict(float)
    for (task, recipe), group in groups.items():
        metas = list(group["metas"].values())
        settings.add(_settings(metas[0]))
        conv = [m for m in metas if m["converged"]]
        acc = [m["metrics"][split]["acc"] for m in metas]
        conv_acc = [m["metrics"][split]["acc"] for m in conv]
        wall = sum(group["walls"].values()) if group["walls"] else None
        pop = sorted({m.get("population_size") for m in metas if m.get("population_size")})
        total["networks"] += len(metas)
        total["converged"] += len(conv)
        total["wall"] += wall or 0.0
        row = [task, *([recipe] if several else []), str(len(metas)),
               f"{len(conv) / len(metas):.0%} ({len(conv)})",
               format_number(median([m["epochs"] for m in conv]), 1), format_number(median([m["epochs"] for m in metas]), 1),
               format_number(median(acc)), format_number(min(conv_acc) if conv_acc else None)]
        if trigger:
            triggered = [m["metrics"][f"{split}_trigger"]["acc"] for m in metas if f"{split}_trigger" in m["metrics"]]
            conv_triggered = [m["metrics"][f"{split}_trigger"]["acc"] for m in conv
                              if f"{split}_trigger" in m["metrics"]]
            row += [format_number(median(triggered)), format_number(min(conv_triggered) if conv_triggered else None)]
        row += [format_number(wall, 0) + (f" (populations of {','.join(map(str, pop))})" if wall is not None and pop else "")]
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
    parser.add_argument("--recipe", action="append", help="only networks of this recipe hash (repeatable)")
    parser.add_argument("--stop-loss", type=float, help="replay a looser stop threshold on the recorded histories")
    parser.add_argument("--max-epochs", type=int, help="replay a smaller epoch limit on the recorded histories")
    args = parser.parse_args(argv)
    groups = collect(args.root, args.dataset)
    if args.recipe:
        groups = {(task, recipe): group for (task, recipe), group in groups.items() if recipe in args.recipe}
    if not groups:
        print(f"no stored networks of {args.dataset} under {args.root}"
              + (f" with recipe {', '.join(args.recipe)}" if args.recipe else ""))
        return 1
    if args.stop_loss is None and args.max_epochs is None:
        print(table(args.dataset, groups))
        return 0
    try:
        for group in groups.values():
            group["metas"] = {key: replay(meta, args.stop_loss, args.max_epochs) for key, meta in group["metas"].items()}
    except ReplayError as err:
        print(f"error: {err}")
        return 2
    print(table(args.dataset, groups, split="val"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
