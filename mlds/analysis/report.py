"""The whole baseline analysis of a zoo: ``analysis.json``, PNG figures and a summary table.

    python scripts/analyze.py outputs/zoo --out outputs/analysis/report

``analysis.json`` (every probe entry also names its scope, features and model, so that
scripts need not parse keys)::

    {"source": ..., "zoo": {"networks", "datasets": {ds: {"architecture", "params", "networks", "converged",
                             "tasks": {task: {"networks", "converged", "train", "val", "test"}}}}},
     "splits": {"rule", "version", "fractions"}, "features": {name: description},
     "task_identification": {"<dataset>/<features>/<model>": {"accuracy", "chance", "control_accuracy",
                             "n_train", "n_test", "classes", "confusion", ...}},
     "backdoor_detection":  {"<pair>/<features>/<model>": {"auroc", "control_auroc", "n_train", "n_test", ...}},
     "accuracy_prediction": {"<dataset>:<target>/<features>/<model>":
                             {"r2", "kendall_tau", "baseline_r2", "control_r2", "n_train", "n_test",
                              "y_true", "y_pred" (test networks), ...}},
     "canonicalisation": {"<section>/<scope>/<model>": {"metric", "raw", "canon", "gain"}},
     "skipped": [{"probe", "scope", "reason"}], "figures": [...], "seconds": ...}

Pairs: ``ds1-vs-ds2:<machine>`` (DS1 = 0, DS2 = 1; networks of one machine), ``ds1-vs-ds2:all``
(every machine), ``ds1-vs-ds2:converging`` (machines on which at least half of the networks
of both datasets converged), ``ds4:clean-vs-trojaned`` / ``clean-vs-patch`` / ``clean-vs-blend``.
Targets: ``test_acc`` (every network), ``val_loss_nonconverged`` (final validation loss of the
networks that did not converge), ``test_trigger_acc`` (DS2: the inverted steps of triggered
sequences; DS4: attack success rate of trojaned networks). The baseline ``task/task_mean``
predicts the mean of the network's task. Probes that do not apply to the zoo given are left out,
with a line in ``skipped`` when the zoo almost had what they need.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from mlds.analysis import features as F
from mlds.analysis import probes
from mlds.analysis.data import Group, load_zoo
from mlds.zoo.splits import FRACTIONS, SPLIT_VERSION

DEFAULT_FEATURES = ("raw", "stats", "io", "canon", "delta", "delta_io", "units")
PAIR_DS = ("ds1", "ds2")


class Analysis:
    """State of one run: how to run a probe's grid of cells, and the probes skipped."""

    def __init__(self, echo: Callable[[str], None], names: Sequence[str], control_repeats: int = probes.CONTROL_REPEATS,
                 select: bool = True, jobs: int = 1):
        self.echo = echo
        self.names = list(names)
        self.repeats = int(control_repeats)
        self.select_models = select
        self.jobs = int(jobs)
        self.layouts: dict[str, list] = {}  # dataset -> unit layout of its "units" features
        self.skipped: list[dict] = []

    def skip(self, probe: str, scope: str, reason: str) -> None:
        self.skipped.append({"probe": probe, "scope": scope, "reason": reason})
        self.echo(f"skipped {probe} [{scope}]: {reason}")

    def layout(self, ds: str, features: str):
        """The unit layout of ``ds``'s ``units`` features (what ``deepsets`` needs), else None."""
        return self.layouts.get(ds) if features == "units" else None

    def run(self, calls: list[tuple[Callable, tuple, dict]]) -> list:
        """``fn(*args, **kwargs)`` of every call (a :class:`probes.Skip` it raises is returned), in up to
        ``jobs`` worker processes."""
        if self.jobs == 1 or len(calls) < 2:
            return [_call(fn, args, kwargs) for fn, args, kwargs in calls]
        from joblib import Parallel, delayed
        return Parallel(n_jobs=self.jobs)(delayed(_call)(fn, args, kwargs) for fn, args, kwargs in calls)

    def probe(self, section: str, result: dict, scope: str, ds: str, fields: dict, fn: Callable, kind: str,
              models, X_of: Callable[[str], np.ndarray], y, splits, seeds, **kwargs) -> None:
        """Every (features, model) cell of ``scope``: ``fn(X_of(f), y, splits, m, **kwargs)`` into
        ``result["<scope>/<f>/<m>"]`` (with ``fields``), then the cross-validated choice among them
        (:meth:`select`). A probe that does not apply is skipped with its reason."""
        grid = cells(self.names, models)
        out = self.run([(fn, (X_of(f), y, splits, m), dict(kwargs, control_repeats=self.repeats,
                                                            layout=self.layout(ds, f))) for f, m in grid])
        skipped = next((r for r in out if isinstance(r, probes.Skip)), None)
        if skipped is not None:
            self.skip(section, scope, str(skipped))
            return
        for (f, m), r in zip(grid, out):
            result[f"{scope}/{f}/{m}"] = {**fields, "features": f, "model": m, **r}
        if self.select_models:
            self.select(result, scope, ds, grid, X_of, y, splits, seeds, kind)

    def select(self, result: dict, scope: str, ds: str, grid, X_of, y, splits, seeds, kind: str) -> None:
        """Add ``<scope>/selected/cv``: the cell of ``grid`` with the best cross-validated score on the
        training side (:func:`mlds.analysis.probes.cv_score`), with that cell's test result -- the
        number to quote, chosen without looking at the test split."""
        scores = self.run([(probes.cv_score, (X_of(f), y, splits, seeds, m, kind, self.layout(ds, f)), {})
                           for f, m in grid])
        cv = {f"{f}/{m}": v for (f, m), v in zip(grid, scores) if v is not None}
        if not cv:
            self.skip("model_selection", scope, "too few training networks to cross-validate")
            return
        chosen = max(cv, key=cv.get)
        result[f"{scope}/selected/cv"] = {**result[f"{scope}/{chosen}"], "features": "selected", "model": "cv",
                                          "chosen": chosen, "cv_score": cv[chosen], "cv_scores": cv}


def _call(fn: Callable, args: tuple, kwargs: dict):
    """``fn(*args, **kwargs)``, or the :class:`probes.Skip` it raised. An MLP that stops at its
    iteration cap (as the shuffled-label controls often do) is not worth a warning per fit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            return fn(*args, **kwargs)
        except probes.Skip as err:
            return err


def cells(names, models) -> list[tuple[str, str]]:
    """The (features, model) pairs to run: every pair, except ``deepsets`` on anything but ``units``."""
    return [(f, m) for f in names for m in models if m != "deepsets" or f == "units"]


def zoo_summary(groups: dict[str, Group]) -> dict:
    out = {"networks": sum(len(g) for g in groups.values()), "datasets": {}}
    for ds, g in groups.items():
        conv = g.converged
        tasks = {}
        for t in g.task_order:
            m = np.array([x == t for x in g.tasks])
            tasks[t] = {"networks": int(m.sum()), "converged": int((m & conv).sum()),
                        **{s: int((m & (g.splits == s)).sum()) for s in ("train", "val", "test")}}
        out["datasets"][ds] = {"architecture": g.architecture, "params": int(g.vectors.shape[1]),
                               "networks": len(g), "converged": int(conv.sum()), "tasks": tasks}
    return out


def _task_identification(a: Analysis, groups, feats, classifiers, result) -> None:
    for ds, g in groups.items():
        if len(g.task_order) < 2:
            a.skip("task_identification", ds, f"{ds} holds networks of one task only ({g.task_order[0]}): "
                                              "nothing to tell apart")
            continue
        a.probe("task_identification", result, ds, ds, {"dataset": ds}, probes.classify, "classify", classifiers,
                lambda f, ds=ds: feats[ds][f], np.array(g.tasks), g.splits, g.seeds, classes=g.task_order)


def _pairs(a: Analysis, groups) -> list[tuple[str, Group, np.ndarray, Group, np.ndarray]]:
    """(pair name, negative group, its mask, positive group, its mask) of every backdoor probe that applies."""
    pairs = []
    have = [d for d in PAIR_DS if d in groups]
    if len(have) == 1:
        a.skip("backdoor_detection", "ds1-vs-ds2", f"needs networks of both ds1 and ds2; the zoo holds only {have[0]}")
    elif len(have) == 2:
        g1, g2 = groups["ds1"], groups["ds2"]
        if g1.architecture != g2.architecture:
            a.skip("backdoor_detection", "ds1-vs-ds2", f"ds1 and ds2 networks have different architectures "
                                                        f"({g1.architecture}, {g2.architecture})")
        else:
            t1, t2 = np.array(g1.tasks), np.array(g2.tasks)
            common = [t for t in g1.task_order if t in set(g2.tasks)]
            if not common:
                a.skip("backdoor_detection", "ds1-vs-ds2", "ds1 and ds2 share no machine")
            converging = [t for t in common
                          if g1.converged[t1 == t].mean() >= 0.5 and g2.converged[t2 == t].mean() >= 0.5]
            for t in common:
                pairs.append((f"ds1-vs-ds2:{t}", g1, t1 == t, g2, t2 == t))
            if len(common) > 1:
                pairs.append(("ds1-vs-ds2:all", g1, np.isin(t1, common), g2, np.isin(t2, common)))
            if converging and len(converging) < len(common):
                pairs.append(("ds1-vs-ds2:converging", g1, np.isin(t1, converging), g2, np.isin(t2, converging)))
    if "ds4" in groups:
        g = groups["ds4"]
        t = np.array(g.tasks)
        trojans = [k for k in g.task_order if k != "clean"]
        if "clean" not in g.task_order or not trojans:
            a.skip("backdoor_detection", "ds4", f"needs clean and trojaned ds4 networks; found {g.task_order}")
        else:
            if len(trojans) > 1:
                pairs.append(("ds4:clean-vs-trojaned", g, t == "clean", g, t != "clean"))
            for k in trojans:
                pairs.append((f"ds4:clean-vs-{k}", g, t == "clean", g, t == k))
    return pairs


def _backdoor_detection(a: Analysis, groups, feats, classifiers, result) -> None:
    for pair, gn, mn, gp, mp in _pairs(a, groups):
        y = np.r_[np.zeros(int(mn.sum()), int), np.ones(int(mp.sum()), int)]

        def X_of(f: str, gn=gn, mn=mn, gp=gp, mp=mp) -> np.ndarray:
            return np.concatenate([feats[gn.dataset][f][mn], feats[gp.dataset][f][mp]])

        a.probe("backdoor_detection", result, pair, gn.dataset, {"pair": pair}, probes.detect, "detect", classifiers,
                X_of, y, np.r_[gn.splits[mn], gp.splits[mp]], np.r_[gn.seeds[mn], gp.seeds[mp]])


def _targets(g: Group) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, mask, values) of each accuracy-prediction target the group has."""
    def metric(split: str, key: str) -> np.ndarray:
        return np.array([float(((m.get("metrics") or {}).get(split) or {}).get(key, np.nan)) for m in g.metas])
    out = []
    acc = metric("test", "acc")
    out.append(("test_acc", np.isfinite(acc), acc))
    loss = metric("val", "loss")
    out.append(("val_loss_nonconverged", ~g.converged & np.isfinite(loss), loss))
    trig = metric("test_trigger", "acc")
    if np.isfinite(trig).any():
        out.append(("test_trigger_acc", np.isfinite(trig), trig))
    return out


def _accuracy_prediction(a: Analysis, groups, feats, regressors, result) -> None:
    for ds, g in groups.items():
        for target, mask, values in _targets(g):
            scope = f"{ds}:{target}"
            y, splits = values[mask], g.splits[mask]
            try:
                base = probes.task_mean(y, np.array(g.tasks)[mask], splits)
            except probes.Skip as err:
                a.skip("accuracy_prediction", scope, str(err))
                continue
            result[f"{scope}/task/task_mean"] = {"dataset": ds, "target": target, "features": "task",
                                                 "model": "task_mean", **base}
            a.probe("accuracy_prediction", result, scope, ds, {"dataset": ds, "target": target}, probes.regress,
                    "regress", regressors, lambda f, ds=ds, mask=mask: feats[ds][f][mask], y, splits, g.seeds[mask])


def _canonicalisation(result: dict) -> dict:
    """Did canonicalisation help? For every probe run on both ``raw`` and ``canon``: both values and the gain."""
    out = {}
    for section, metric in (("task_identification", "accuracy"), ("backdoor_detection", "auroc"),
                            ("accuracy_prediction", "r2")):
        for key, r in result[section].items():
            if r.get("features") != "canon":
                continue
            scope, _, model = key.rsplit("/", 2)
            raw = result[section].get(f"{scope}/raw/{model}")
            if raw is None:
                continue
            out[f"{section}/{scope}/{model}"] = {"metric": metric, "raw": raw[metric], "canon": r[metric],
                                                 "gain": r[metric] - raw[metric]}
    return out


def _figures(a: Analysis, out: Path, groups, feats, result, tsne: bool) -> list[str]:
    from mlds.analysis import figures as fig
    made = []
    methods = ("pca", "tsne") if tsne else ("pca",)
    panel_names = [n for n in ("raw", "stats", "delta") if n in next(iter(feats.values()))]
    for ds, g in groups.items():
        if len(g) >= 4 and panel_names:
            made.append(fig.embedding(out / f"embedding_{ds}.png", {n: feats[ds][n] for n in panel_names}, g.tasks,
                                      f"{ds}: {len(g)} networks ({g.architecture}), coloured by task",
                                      methods=methods))
        made.append(fig.loss_curves(out / f"loss_curves_{ds}.png", g.metas, g.tasks, f"{ds} loss per epoch",
                                    order=g.task_order))
    if all(d in groups for d in PAIR_DS) and groups["ds1"].architecture == groups["ds2"].architecture and panel_names:
        g1, g2 = groups["ds1"], groups["ds2"]
        made.append(fig.embedding(out / "embedding_ds1_ds2.png",
                                  {n: np.concatenate([feats["ds1"][n], feats["ds2"][n]]) for n in panel_names},
                                  g1.tasks + g2.tasks, "ds1 (circles) and ds2 (triangles), coloured by machine",
                                  markers=["ds1"] * len(g1) + ["ds2"] * len(g2), methods=methods))
    rows = [(ds, t, v["converged"], v["networks"]) for ds, d in result["zoo"]["datasets"].items()
            for t, v in d["tasks"].items()]
    if rows:
        made.append(fig.convergence(out / "convergence.png", rows))
    for ds in groups:
        best = _shown(result["task_identification"], ds, "accuracy")
        if best:
            made.append(fig.confusion(out / f"confusion_{ds}.png", best["confusion"], best["classes"],
                                      f"{ds} task identification, {_cell(best)}: "
                                      f"accuracy {best['accuracy']:.3f} (chance {best['chance']:.2f})"))
    if result["backdoor_detection"]:
        made.append(fig.auroc_bars(out / "backdoor_auroc.png", result["backdoor_detection"]))
    for ds in groups:
        best = _shown(result["accuracy_prediction"], f"{ds}:test_acc", "r2")
        if best and "y_pred" in best:
            tau = best["kendall_tau"]
            made.append(fig.prediction_scatter(out / f"accuracy_prediction_{ds}.png", best["y_true"],
                                               best["y_pred"], f"{ds} test accuracy, {_cell(best)}: R² "
                                               f"{best['r2']:.2f}, τ {'n/a' if tau is None else f'{tau:.2f}'}",
                                               "test accuracy"))
    return [str(p) for p in made]


def _shown(section: dict, scope: str, metric: str) -> dict | None:
    """The result a figure shows for ``scope``: the cross-validated choice, else the best test value
    (model selection off)."""
    if f"{scope}/selected/cv" in section:
        return section[f"{scope}/selected/cv"]
    mine = [r for k, r in section.items() if k.rsplit("/", 2)[0] == scope and r.get("model") != "task_mean"]
    return max(mine, key=lambda r: r[metric]) if mine else None


def _cell(r: dict) -> str:
    return f"{r['chosen']} (chosen by CV on train+val)" if "chosen" in r else f"{r['features']}/{r['model']}"


def analyze(source, out, *, features: Sequence[str] = DEFAULT_FEATURES,
            classifiers: Sequence[str] = probes.CLASSIFIERS, regressors: Sequence[str] = probes.REGRESSORS,
            tsne: bool = True, figures: bool = True, on_conflict: str = "error", datasets=None,
            control_repeats: int = probes.CONTROL_REPEATS, threads: int | None = None, select: bool = True,
            jobs: int = 1, echo: Callable[[str], None] | None = None) -> dict:
    """Run every probe that applies to the zoo at ``source``; write ``<out>/analysis.json`` and figures.

    ``threads``: cap on BLAS/OpenMP threads (scikit-learn, numpy) while it runs (None: their default).
    ``select``: add each scope's cross-validated choice of features and model (``<scope>/selected/cv``).
    ``jobs``: worker processes for a probe's cells (joblib; -1: every core)."""
    if threads is None:
        return _analyze(source, out, features, classifiers, regressors, tsne, figures, on_conflict, datasets,
                        control_repeats, select, jobs, echo)
    from threadpoolctl import threadpool_limits
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with threadpool_limits(int(threads)):
            return _analyze(source, out, features, classifiers, regressors, tsne, figures, on_conflict, datasets,
                            control_repeats, select, jobs, echo)
    finally:
        torch.set_num_threads(before)


def _analyze(source, out, features, classifiers, regressors, tsne, figures, on_conflict, datasets, control_repeats,
             select, jobs, echo) -> dict:
    echo = echo or (lambda s: print(s, file=sys.stderr))
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(features) - set(F.FEATURES))
    if unknown:
        raise ValueError(f"unknown feature sets {unknown}; known: {', '.join(F.FEATURES)}")
    names = list(dict.fromkeys(features))
    a = Analysis(echo, names, control_repeats, select, jobs)
    groups, load_skips = load_zoo(source, on_conflict=on_conflict, datasets=datasets)
    for s in load_skips:
        a.skip(s["probe"], s["dataset"], s["reason"])
    if not groups:
        raise ValueError(f"no networks in {source}")
    counts = ", ".join(f"{d}: {len(g)}" for d, g in groups.items())
    echo(f"read {sum(len(g) for g in groups.values())} networks ({counts}) in {time.perf_counter() - started:.1f} s")
    feats = {ds: F.compute(g, names) for ds, g in groups.items()}
    if "deepsets" in (*classifiers, *regressors) and "units" not in names:
        a.skip("all", "deepsets", "the deepsets model runs on the 'units' feature set only; add it to --features")
    if "units" in names:
        from mlds.analysis.unit_sets import unit_features
        a.layouts = {ds: unit_features(g.subset(np.arange(len(g)) == 0))[1] for ds, g in groups.items()}
    result: dict = {
        "source": str(source), "zoo": zoo_summary(groups),
        "splits": {"version": SPLIT_VERSION, "fractions": FRACTIONS,
                   "rule": "by seed alone: u = int(sha256('mlds-split-v1-<seed>')[:16 hex], 16) / 2**64; test if "
                           "u < 0.5, train if u < 0.9, else val (mlds.zoo.splits). Probes fit on train + val, "
                           "score on test."},
        "features": {n: F.DESCRIPTIONS[n] for n in names},
        "protocol": {"fit": "train + val splits", "score": "test split", "classifiers": list(classifiers),
                     "selection": (f"<scope>/selected/cv: the features/model cell with the best {probes.CV_FOLDS}-fold "
                                   "cross-validated score on train + val (folds grouped by seed), reported on test"
                                   if select else "off"),
                     "regressors": list(regressors), "control": f"labels (targets) of the training side randomly "
                     f"permuted, mean of {control_repeats} permutations", "tree_models": "hgb and mlp on more "
                     f"than {probes.MAX_TREE_FEATURES} features: standardise + PCA(<= {probes.PCA_COMPONENTS}) first"},
        "task_identification": {}, "backdoor_detection": {}, "accuracy_prediction": {},
    }
    steps = (("task identification", _task_identification, classifiers, "task_identification"),
             ("backdoor detection", _backdoor_detection, classifiers, "backdoor_detection"),
             ("accuracy prediction", _accuracy_prediction, regressors, "accuracy_prediction"))
    for title, step, models, section in steps:
        t0 = time.perf_counter()
        step(a, groups, feats, models, result[section])
        echo(f"{title}: {len(result[section])} probes in {time.perf_counter() - t0:.1f} s")
    result["canonicalisation"] = _canonicalisation(result)
    result["skipped"] = a.skipped
    if figures:
        t0 = time.perf_counter()
        result["figures"] = [Path(p).name for p in _figures(a, out, groups, feats, result, tsne)]
        echo(f"figures: {len(result['figures'])} in {time.perf_counter() - t0:.1f} s")
    else:
        result["figures"] = []
    result["seconds"] = round(time.perf_counter() - started, 2)
    (out / "analysis.json").write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    return result


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fmt(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


_N_TRAIN = ("train", 5, lambda r: r["n_train"])
_N_TEST = ("test", 5, lambda r: r["n_test"])
SUMMARY_TABLES = (  # section, title, key column header and width, (header, width, value) columns
    ("task_identification", "task identification (test accuracy)", "dataset/features/model", 34,
     (("acc", 6, lambda r: _fmt(r["accuracy"])), ("chance", 6, lambda r: _fmt(r["chance"], 2)),
      ("control", 7, lambda r: _fmt(r["control_accuracy"])), _N_TRAIN, _N_TEST)),
    ("backdoor_detection", "backdoor detection (test AUROC; chance 0.5)", "pair/features/model", 44,
     (("AUROC", 6, lambda r: _fmt(r["auroc"])), ("control", 7, lambda r: _fmt(r["control_auroc"])), _N_TRAIN,
      _N_TEST)),
    ("accuracy_prediction", "accuracy prediction (test R², Kendall τ)", "dataset:target/features/model", 48,
     (("R2", 7, lambda r: _fmt(r["r2"])), ("tau", 6, lambda r: _fmt(r["kendall_tau"], 2)),
      ("control R2", 10, lambda r: _fmt(r.get("control_r2"))), _N_TEST)),
)


def summary(result: dict) -> str:
    """A short plain-text table of every probe result."""
    lines = []
    z = result["zoo"]
    lines.append(f"zoo: {z['networks']} networks · " + ", ".join(
        f"{d}: {v['networks']} ({v['converged']} converged, {len(v['tasks'])} tasks, {v['params']} params)"
        for d, v in z["datasets"].items()))
    for section, title, key_header, width, columns in SUMMARY_TABLES:
        if not result[section]:
            continue
        lines.append(f"\n{title}")
        lines.append(f"  {key_header:{width}} " + " ".join(f"{h:>{w}}" for h, w, _ in columns))
        for k, r in result[section].items():
            chosen = f"  <- {r['chosen']} (CV {r['cv_score']:.3f})" if "chosen" in r else ""
            lines.append(f"  {k:{width}} " + " ".join(f"{str(v(r)):>{w}}" for _, w, v in columns) + chosen)
    if result.get("canonicalisation"):
        gains = [v["gain"] for v in result["canonicalisation"].values()]
        helped = sum(g > 0 for g in gains)
        lines.append(f"\ncanonicalisation vs raw weights: better on {helped} of {len(gains)} probes "
                     f"(mean gain {np.mean(gains):+.3f})")
    for s in result.get("skipped", []):
        lines.append(f"skipped {s['probe']} [{s['scope']}]: {s['reason']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Baseline weights-as-data analyses of a zoo (probes, figures, JSON).")
    p.add_argument("source", help="zoo root, release package folder, or shard")
    p.add_argument("--out", default="outputs/analysis/report", help="output folder (default: %(default)s)")
    p.add_argument("--features", default=",".join(DEFAULT_FEATURES),
                   help=f"comma-separated feature sets from {', '.join(F.FEATURES)} (default: %(default)s)")
    p.add_argument("--classifiers", default=",".join(probes.CLASSIFIERS), help="default: %(default)s")
    p.add_argument("--regressors", default=",".join(probes.REGRESSORS), help="default: %(default)s")
    p.add_argument("--dataset", action="append", help="only this dataset (repeatable)")
    p.add_argument("--no-tsne", action="store_true", help="PCA embeddings only (faster)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--control-repeats", type=int, default=probes.CONTROL_REPEATS,
                   help="shuffled-label controls per probe, averaged (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="cap on BLAS/OpenMP threads (default: library default)")
    p.add_argument("--jobs", type=int, default=-1,
                   help="worker processes for the probes' cells (default: every core; 1: in this process)")
    p.add_argument("--no-select", action="store_true",
                   help="skip the cross-validated choice of features and model per probe (faster)")
    p.add_argument("--on-conflict", choices=("error", "first"), default="error",
                   help="a key stored in two different versions: stop (default) or keep the first")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    try:
        result = analyze(args.source, args.out, features=split(args.features), classifiers=split(args.classifiers),
                         regressors=split(args.regressors), tsne=not args.no_tsne, figures=not args.no_figures,
                         on_conflict=args.on_conflict, datasets=args.dataset,
                         control_repeats=args.control_repeats, threads=args.threads, select=not args.no_select,
                         jobs=args.jobs)
    except (ValueError, FileNotFoundError) as err:
        print(f"analyze: {err}", file=sys.stderr)
        return 2
    print(summary(result))
    print(f"\nwrote {Path(args.out) / 'analysis.json'} and {len(result['figures'])} figures in {result['seconds']} s")
    return 0
