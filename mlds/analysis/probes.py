"""Probes: what can be read from weights, on held-out seeds, each with its trivial baseline and a control.

Protocol (all probes): fit on the networks of the ``train`` and ``val`` splits
(:mod:`mlds.zoo.splits`; the baselines here have fixed hyperparameters, so
``val`` is not needed for selection and joins the training side), score on the
``test`` split. Every result also carries a *shuffled-label control*: the same
model fitted on the same networks with their training labels (targets)
randomly permuted, scored on the real test labels, averaged over
``control_repeats`` permutations (each value is kept too) -- it must land at
chance (accuracy near the majority share, AUROC near 0.5, R^2 at or below 0); a
control far above chance means the protocol leaks. With a few dozen training
networks a single permutation still agrees with the true labels by chance more
than one would guess, hence the average.

Models:

- classification: ``logreg`` (standardise, multinomial logistic regression, C=1),
  ``hgb`` (``HistGradientBoostingClassifier``) and ``mlp`` (standardise, one hidden layer of 64
  ReLU units, L2 penalty alpha=1) and ``deepsets`` (:class:`mlds.analysis.unit_sets.UnitSetModel`:
  learned, invariant to hidden-unit order; only on the ``units`` feature set, whose ``layout`` it needs);
- regression: ``ridge`` (standardise, ``RidgeCV`` over alphas 1e-2..1e4, efficient leave-one-out on
  the training side), ``hgb`` (``HistGradientBoostingRegressor``), ``mlp`` and ``deepsets`` (as above).

Model selection (:func:`cv_score`): the fixed split's test side is scored once per cell;
choosing a feature set and model is done by cross-validation on the training side alone,
folds grouped by seed (networks of one seed share their initial weights) and, for classes,
stratified.

Tree models and the MLP on more than :data:`MAX_TREE_FEATURES` features
(flattened weights) first project onto at most 64 principal components fitted
on the training side (recorded as ``preprocess``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import kendalltau
from sklearn.decomposition import PCA
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import confusion_matrix, r2_score, roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

MAX_TREE_FEATURES = 1024
PCA_COMPONENTS = 64
CLASSIFIERS = ("logreg", "hgb", "mlp", "deepsets")
REGRESSORS = ("ridge", "hgb", "mlp", "deepsets")
CV_FOLDS = 5
MIN_TRAIN_PER_CLASS = 1
MIN_TRAIN_REGRESSION, MIN_TEST_REGRESSION = 5, 3


class Skip(Exception):
    """A probe that does not apply: the message says why."""


@dataclass(frozen=True)
class Sides:
    """Boolean masks of the training side (train + val) and the test side."""

    train: np.ndarray
    test: np.ndarray

    @classmethod
    def of(cls, splits: np.ndarray) -> "Sides":
        splits = np.asarray(splits)
        return cls(np.isin(splits, ("train", "val")), splits == "test")


def _projection(n_features: int, n_train: int) -> tuple[list, str | None]:
    """Preprocessing of the tree and MLP models: on more than :data:`MAX_TREE_FEATURES` features,
    standardise and project onto at most :data:`PCA_COMPONENTS` principal components."""
    if n_features <= MAX_TREE_FEATURES:
        return [], None
    k = max(1, min(PCA_COMPONENTS, n_train - 1, n_features))
    return [StandardScaler(), PCA(n_components=k, random_state=0)], f"standardise + PCA({k})"


MLP = dict(hidden_layer_sizes=(64,), alpha=1.0, max_iter=2000, random_state=0)
# per task: its linear model, and the estimator classes of ``hgb`` and ``mlp``
_MODELS = {"classify": ("logreg", HistGradientBoostingClassifier, MLPClassifier),
           "regress": ("ridge", HistGradientBoostingRegressor, MLPRegressor)}


def make_model(name: str, task: str, n_features: int, n_train: int, layout=None) -> tuple[Pipeline, str | None]:
    """A fresh model and a description of its preprocessing (None: none beyond the model's own).
    ``layout``: the unit layout of ``units`` features (needed by ``deepsets`` only)."""
    if task in _MODELS:
        linear, trees, mlp = _MODELS[task]
        if name == "deepsets":
            if layout is None:
                raise ValueError("the deepsets model needs per-unit features (feature set 'units') and their layout")
            from mlds.analysis.unit_sets import UnitSetModel
            return UnitSetModel(layout, task), "standardise per layer and feature"
        if name == linear:
            model = (LogisticRegression(C=1.0, max_iter=5000) if task == "classify"
                     else RidgeCV(alphas=np.logspace(-2, 4, 13)))
            return make_pipeline(StandardScaler(), model), "standardise"
        steps, pre = _projection(n_features, n_train)
        if name == "hgb":
            leaf = int(min(20, max(2, n_train // 10)))
            return make_pipeline(*steps, trees(max_iter=100, min_samples_leaf=leaf, early_stopping=False,
                                               random_state=0)), pre
        if name == "mlp":
            return make_pipeline(*(steps or [StandardScaler()]), mlp(**MLP)), pre or "standardise"
    raise ValueError(f"unknown {task} model {name!r}; choose from "
                     f"{', '.join(CLASSIFIERS if task == 'classify' else REGRESSORS)}")


CONTROL_REPEATS = 5


def _shuffled(y: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(y)


def _controls(model: str, task: str, X_train, y_train, X_test, score, repeats: int, seed: int,
              layout=None) -> list[float]:
    """``score(prediction)`` of ``repeats`` models fitted on permuted training labels."""
    out = []
    for r in range(repeats):
        est = make_model(model, task, X_train.shape[1], len(y_train), layout)[0]
        est.fit(X_train, _shuffled(y_train, seed + r))
        out.append(score(est))
    return out


def _check_classes(y: np.ndarray, sides: Sides) -> tuple[np.ndarray, list[str]]:
    """Mask of networks whose class has networks on both sides; notes on classes dropped."""
    keep = np.zeros(len(y), dtype=bool)
    notes = []
    for c in np.unique(y):
        n_tr, n_te = int(((y == c) & sides.train).sum()), int(((y == c) & sides.test).sum())
        if n_tr >= MIN_TRAIN_PER_CLASS and n_te >= 1:
            keep |= (y == c)
        else:
            notes.append(f"class {c} left out: {n_tr} training / {n_te} test networks")
    return keep, notes


def classify(X: np.ndarray, y, splits, model: str = "logreg", control_seed: int = 0,
             classes: list | None = None, control_repeats: int = CONTROL_REPEATS, layout=None) -> dict:
    """Multi-class probe: accuracy on the test side, its chance level, the shuffled-label control and
    the confusion matrix (rows: true, columns: predicted, in ``classes`` order)."""
    y = np.asarray(y)
    sides = Sides.of(splits)
    keep, notes = _check_classes(y, sides)
    classes = [c for c in (classes if classes is not None else sorted(np.unique(y))) if c in set(y[keep])]
    if len(classes) < 2:
        raise Skip(f"needs networks of at least 2 tasks on both sides of the split (train+val and test); "
                   f"found {len(classes)}" + (f" ({'; '.join(notes)})" if notes else ""))
    tr, te = sides.train & keep, sides.test & keep
    est, pre = make_model(model, "classify", X.shape[1], int(tr.sum()), layout)
    pred = est.fit(X[tr], y[tr]).predict(X[te])
    values, counts = np.unique(y[tr], return_counts=True)
    majority = values[np.argmax(counts)]
    controls = _controls(model, "classify", X[tr], y[tr], X[te], lambda e: float(np.mean(e.predict(X[te]) == y[te])),
                         control_repeats, control_seed, layout)
    out = {"accuracy": float(np.mean(pred == y[te])), "chance": float(np.mean(y[te] == majority)),
           "uniform": 1.0 / len(classes), "control_accuracy": _mean(controls), "control_sd": _sd(controls),
           "control_values": controls,
           "n_train": int(tr.sum()), "n_test": int(te.sum()), "n_classes": len(classes),
           "classes": [str(c) for c in classes],
           "confusion": confusion_matrix(y[te], pred, labels=classes).tolist()}
    if pre:
        out["preprocess"] = pre
    if notes:
        out["notes"] = notes
    return out


def detect(X: np.ndarray, y, splits, model: str = "logreg", control_seed: int = 0,
           control_repeats: int = CONTROL_REPEATS, layout=None) -> dict:
    """Binary probe (1 = backdoored / trojaned): AUROC on the test side and the shuffled-label control."""
    y = np.asarray(y).astype(int)
    sides = Sides.of(splits)
    for side, mask in (("training (train+val)", sides.train), ("test", sides.test)):
        n_pos, n_neg = int((y[mask] == 1).sum()), int((y[mask] == 0).sum())
        need = 2 if side.startswith("training") else 1
        if n_pos < need or n_neg < need:
            raise Skip(f"needs at least {need} networks of each class on the {side} side; found {n_neg} clean "
                       f"and {n_pos} backdoored")
    tr, te = sides.train, sides.test
    est, pre = make_model(model, "classify", X.shape[1], int(tr.sum()), layout)
    score = est.fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
    controls = _controls(model, "classify", X[tr], y[tr], X[te],
                         lambda e: float(roc_auc_score(y[te], e.predict_proba(X[te])[:, 1])), control_repeats,
                         control_seed, layout)
    out = {"auroc": float(roc_auc_score(y[te], score)), "chance": 0.5,
           "control_auroc": _mean(controls), "control_sd": _sd(controls), "control_values": controls,
           "accuracy": float(np.mean((score >= 0.5) == y[te])),
           "n_train": int(tr.sum()), "n_test": int(te.sum()),
           "n_positive_test": int(y[te].sum()), "n_negative_test": int((1 - y[te]).sum())}
    if pre:
        out["preprocess"] = pre
    return out


def cv_score(X: np.ndarray, y, splits, seeds, model: str, kind: str, layout=None) -> float | None:
    """Cross-validated score of ``model`` on the training side (train + val) only: accuracy
    (``kind="classify"``), AUROC (``"detect"``) or R^2 (``"regress"``), the mean over up to
    :data:`CV_FOLDS` folds grouped by seed (stratified for classes). None when the training side
    is too small to fold."""
    y = np.asarray(y)
    tr = Sides.of(splits).train
    X, y, groups = X[tr], y[tr], np.asarray(seeds)[tr]
    n_groups = len(np.unique(groups))
    if kind == "regress":
        folds = min(CV_FOLDS, n_groups)
        splitter = GroupKFold(n_splits=folds) if folds >= 2 else None
    else:
        folds = min(CV_FOLDS, n_groups, int(np.unique(y, return_counts=True)[1].min()))
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=0) if folds >= 2 else None
    if splitter is None:
        return None
    task = "regress" if kind == "regress" else "classify"
    scores = []
    for fit, held in splitter.split(X, y, groups):
        if kind != "regress" and len(np.unique(y[fit])) < 2:
            continue
        est = make_model(model, task, X.shape[1], len(fit), layout)[0].fit(X[fit], y[fit])
        if kind == "classify":
            scores.append(float(np.mean(est.predict(X[held]) == y[held])))
        elif kind == "detect":
            if len(np.unique(y[held])) == 2:
                scores.append(float(roc_auc_score(y[held], est.predict_proba(X[held])[:, 1])))
        elif np.ptp(y[held]) > 0:
            scores.append(float(r2_score(y[held], est.predict(X[held]))))
    return float(np.mean(scores)) if scores else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _sd(values: list[float]) -> float | None:
    return float(np.std(values)) if values else None


def _tau(a: np.ndarray, b: np.ndarray) -> float | None:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    tau = kendalltau(a, b).statistic
    return None if not np.isfinite(tau) else float(tau)


def _check_regression(y: np.ndarray, sides: Sides) -> None:
    n_tr, n_te = int(sides.train.sum()), int(sides.test.sum())
    if n_tr < MIN_TRAIN_REGRESSION or n_te < MIN_TEST_REGRESSION:
        raise Skip(f"needs at least {MIN_TRAIN_REGRESSION} training and {MIN_TEST_REGRESSION} test networks; "
                   f"found {n_tr} and {n_te}")
    if np.ptp(y[sides.train]) == 0 or np.ptp(y[sides.test]) == 0:
        raise Skip("the target is constant on one side of the split: nothing to rank")


def regress(X: np.ndarray, y, splits, model: str = "ridge", control_seed: int = 0,
            control_repeats: int = CONTROL_REPEATS, layout=None) -> dict:
    """Regression probe: R^2 and Kendall tau on the test side, the train-mean baseline's R^2 and the
    shuffled-target control."""
    y = np.asarray(y, dtype=np.float64)
    sides = Sides.of(splits)
    _check_regression(y, sides)
    tr, te = sides.train, sides.test
    est, pre = make_model(model, "regress", X.shape[1], int(tr.sum()), layout)
    pred = est.fit(X[tr], y[tr]).predict(X[te])
    controls = _controls(model, "regress", X[tr], y[tr], X[te], lambda e: e.predict(X[te]), control_repeats,
                         control_seed, layout)
    taus = [t for t in (_tau(c, y[te]) for c in controls) if t is not None]
    out = {"r2": float(r2_score(y[te], pred)), "kendall_tau": _tau(pred, y[te]),
           "baseline_r2": float(r2_score(y[te], np.full(int(te.sum()), y[tr].mean()))),
           "control_r2": _mean([float(r2_score(y[te], c)) for c in controls]),
           "control_kendall_tau": _mean(taus),
           "n_train": int(tr.sum()), "n_test": int(te.sum()),
           "y_pred": [float(v) for v in pred], "y_true": [float(v) for v in y[te]]}
    if pre:
        out["preprocess"] = pre
    return out


def task_mean(y, groups, splits) -> dict:
    """The trivial baseline that knows each network's task: predict the mean target of its task's
    training networks (the overall training mean for a task without any)."""
    y = np.asarray(y, dtype=np.float64)
    groups = np.asarray(groups)
    sides = Sides.of(splits)
    _check_regression(y, sides)
    tr, te = sides.train, sides.test
    overall = y[tr].mean()
    means = {g: y[tr & (groups == g)].mean() if (tr & (groups == g)).any() else overall for g in np.unique(groups)}
    pred = np.array([means[g] for g in groups[te]])
    return {"r2": float(r2_score(y[te], pred)), "kendall_tau": _tau(pred, y[te]),
            "n_train": int(tr.sum()), "n_test": int(te.sum())}
