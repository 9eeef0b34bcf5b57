"""PNG figures of a zoo and of its probes (matplotlib, Agg backend: no display needed).

Each function writes one file and returns its path:

- :func:`embedding`: 2-D PCA and t-SNE of weight vectors (raw, and per-tensor statistics),
  coloured by task (markers by dataset when there are several);
- :func:`loss_curves`: training (and validation) loss per epoch, median and interquartile band per
  task, from the ``meta.json`` histories (a network that stopped keeps its last value);
- :func:`convergence`: share of converged networks per task, one bar group per dataset;
- :func:`confusion`: confusion matrix of a task-identification probe (row-normalised);
- :func:`auroc_bars`: backdoor-detection AUROC per pair, feature set and model;
- :func:`prediction_scatter`: predicted against true accuracy of an accuracy-prediction probe.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

MARKERS = "o^sDvP*X"


def _colours(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "hsv")
    return [cmap(i % cmap.N) if n <= 20 else cmap(i / max(n, 1)) for i in range(n)]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def project(X: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """``[N, 2]``: PCA of standardised features, or t-SNE of their first (at most) 50 principal components."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler
    Z = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
    n = Z.shape[0]
    if method == "pca":
        k = min(2, n, Z.shape[1])
        out = PCA(n_components=k, random_state=seed).fit_transform(Z)
        return np.pad(out, ((0, 0), (0, 2 - k)))
    if method == "tsne":
        from sklearn.manifold import TSNE
        k = min(50, n - 1, Z.shape[1])
        Z = PCA(n_components=k, random_state=seed).fit_transform(Z) if k >= 2 else Z
        perplexity = float(max(2.0, min(30.0, (n - 1) / 3.0)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(Z)
    raise ValueError(f"unknown projection {method!r}")


def embedding(path: Path, panels: dict[str, np.ndarray], labels, title: str, markers=None,
              methods=("pca", "tsne")) -> Path:
    """Rows: feature sets (``panels``: name -> ``[N, F]``); columns: ``methods``. Colour: ``labels``;
    marker: ``markers`` (e.g. the dataset) when given."""
    labels = np.asarray(labels)
    classes = list(dict.fromkeys(labels.tolist()))
    colours = dict(zip(classes, _colours(len(classes))))
    kinds = list(dict.fromkeys(np.asarray(markers).tolist())) if markers is not None else [None]
    fig, axes = plt.subplots(len(panels), len(methods), figsize=(5.2 * len(methods), 4.4 * len(panels)),
                             squeeze=False)
    for r, (name, X) in enumerate(panels.items()):
        for c, method in enumerate(methods):
            ax = axes[r][c]
            if X.shape[0] < 4:
                ax.text(0.5, 0.5, "too few networks", ha="center", transform=ax.transAxes)
                continue
            P = project(X, method)
            for k, kind in enumerate(kinds):
                for cls in classes:
                    m = labels == cls
                    if kind is not None:
                        m &= np.asarray(markers) == kind
                    if not m.any():
                        continue
                    lab = (f"{cls}" if kind is None else f"{kind}/{cls}") if len(classes) <= 12 else None
                    ax.scatter(P[m, 0], P[m, 1], s=14, color=colours[cls], marker=MARKERS[k % len(MARKERS)],
                               alpha=0.8, linewidths=0, label=lab)
            ax.set_title(f"{name} · {method.upper() if method == 'pca' else 't-SNE'}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _padded(histories: list[list[float]]) -> np.ndarray:
    """``[N, E]``: histories carried forward to the longest one (a stopped network keeps its last value)."""
    length = max(len(h) for h in histories)
    out = np.full((len(histories), length), np.nan)
    for i, h in enumerate(histories):
        if h:
            out[i, :len(h)] = h
            out[i, len(h):] = h[-1]
    return out


def loss_curves(path: Path, metas: list[dict], tasks, title: str, order=None,
                keys=("train_loss", "val_loss")) -> Path:
    """Median and interquartile range per task of each history key, log scale."""
    tasks = np.asarray(tasks)
    order = order or list(dict.fromkeys(tasks.tolist()))
    colours = dict(zip(order, _colours(len(order))))
    keys = [k for k in keys if any(k in (m.get("history") or {}) for m in metas)]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(6 * max(1, len(keys)), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for task in order:
            hs = [m["history"][key] for m, t in zip(metas, tasks) if t == task and (m.get("history") or {}).get(key)]
            if not hs:
                continue
            H = _padded(hs)
            x = np.arange(1, H.shape[1] + 1)
            q25, q50, q75 = np.nanpercentile(H, [25, 50, 75], axis=0)
            lab = f"{task} (n={len(hs)})" if len(order) <= 12 else None
            ax.plot(x, q50, color=colours[task], lw=1.4, label=lab)
            ax.fill_between(x, q25, q75, color=colours[task], alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3, which="both")
    if len(order) <= 12:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(title + " (median, interquartile band; stopped networks keep their last value)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def convergence(path: Path, rows: list[tuple[str, str, int, int]]) -> Path:
    """``rows``: (dataset, task, converged, networks). One bar per task, grouped by dataset."""
    datasets = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(4.0, 0.55 * len(rows) + 2 * len(datasets)), 3.8),
                             squeeze=False, sharey=True)
    for ax, ds in zip(axes[0], datasets):
        mine = [r for r in rows if r[0] == ds]
        share = [c / n if n else 0 for _, _, c, n in mine]
        bars = ax.bar(range(len(mine)), share, color=_colours(len(mine)))
        many = len(mine) > 20
        for b, (_, _, c, n) in zip(bars, mine):
            if not many:
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.02, f"{c}/{n}", ha="center", fontsize=7)
        ax.set_xticks(range(len(mine)) if not many else [])
        if not many:
            ax.set_xticklabels([t for _, t, _, _ in mine], rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1.12)
        ax.set_title(ds)
    axes[0][0].set_ylabel("converged")
    fig.tight_layout()
    return _save(fig, path)


def confusion(path: Path, matrix, classes: list[str], title: str) -> Path:
    M = np.asarray(matrix, dtype=float)
    R = M / np.maximum(M.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.6 * n + 2), max(3.0, 0.55 * n + 1.5)))
    ax.imshow(R, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(classes, rotation=40, ha="right", fontsize=8)
        ax.set_yticklabels(classes, fontsize=8)
        for i in range(n):
            for j in range(n):
                if M[i, j]:
                    ax.text(j, i, int(M[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if R[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def auroc_bars(path: Path, results: dict[str, dict], title: str = "backdoor detection (test AUROC)") -> Path:
    """``results``: the ``backdoor_detection`` section (entries with pair, features, model, auroc)."""
    pairs = list(dict.fromkeys(r["pair"] for r in results.values()))
    combos = list(dict.fromkeys(f"{r['features']}/{r['model']}" for r in results.values()))
    width = 0.8 / max(1, len(combos))
    colours = _colours(len(combos))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(pairs) + 2.5), 4.0))
    for k, combo in enumerate(combos):
        vals = [next((r["auroc"] for r in results.values() if r["pair"] == p and f"{r['features']}/{r['model']}" ==
                      combo), np.nan) for p in pairs]
        ax.bar(np.arange(len(pairs)) + (k - (len(combos) - 1) / 2) * width, vals, width, label=combo,
               color=colours[k])
    ax.axhline(0.5, color="k", lw=0.8, ls="--", label="chance")
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels(pairs, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUROC (test seeds)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def prediction_scatter(path: Path, target: list[float], predicted: list[float], title: str, label: str) -> Path:
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    t, p = np.asarray(target), np.asarray(predicted)
    ax.scatter(t, p, s=12, alpha=0.7)
    lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
    ax.set_xlabel(f"true {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
