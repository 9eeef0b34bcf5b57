"""Weights as data: fixed splits, canonicalisation, probes (planted signal, shuffled control), the analysis script."""
import json

import numpy as np
import pytest
import torch

from mlds.analysis import canonical, probes
from mlds.analysis.report import analyze, main, summary
from mlds.nets.registry import build, init_state_dict
from mlds.zoo.reader import ZooDataset
from mlds.zoo.splits import split_of, split_seeds, split_value
from mlds.zoo.store import Network, ZooStore, sample_key

from conftest import GRU_SPEC, TINY, compose_train

CONV_SPEC = dict(kind="conv", name="cnn3x16-gap-linear10", in_channels=1, channels=16, num_layers=3, num_classes=10,
                 kernel_size=3, stride=2)
SMALL_LSTM = dict(kind="recurrent", name="lstm2x16-mlp20", cell="lstm", input_size=9, hidden_size=16, num_layers=2,
                  head_sizes=[20], output_size=4)


# --------------------------------------------------------------------------- synthetic zoos

def synthetic(dataset, task, seed, spec=GRU_SPEC, shift=None, acc=None, converged=True, epochs=5):
    """A stored network: the initial weights of ``seed`` plus ``shift`` (name -> added value), with a
    history and metrics as the training job writes them."""
    weights = init_state_dict(spec, seed)
    for name, value in (shift or {}).items():
        weights[name] = weights[name] + value
    rng = np.random.default_rng(seed)
    acc = float(acc if acc is not None else 0.9 + 0.05 * rng.random())
    history = {"train_loss": list(np.geomspace(1.0, 0.01 + rng.random() * 0.05, epochs)),
               "val_loss": list(np.geomspace(1.0, 0.02 + rng.random() * 0.05, epochs))}
    meta = {"dataset": dataset, "task": task, "seed": seed, "recipe": f"r{task[:6]}", "converged": converged,
            "epochs": epochs, "architecture": {"param_count": sum(v.numel() for v in weights.values()), **spec},
            "history": history, "metrics": {"test": {"loss": 1 - acc, "acc": acc}, "val": {"loss": 1.1 - acc,
                                                                                           "acc": acc}}}
    return Network(sample_key(dataset, task, seed), weights, meta)


def write_zoo(root, dataset, tasks, seeds, **kw):
    store = ZooStore(root)
    for task in tasks:
        shift = kw.get("shift", {}).get(task)
        nets = [synthetic(dataset, task, s, spec=kw.get("spec", GRU_SPEC), shift=shift,
                          acc=kw.get("acc", lambda t, s: None)(task, s), converged=kw.get("converged", True))
                for s in seeds]
        store.write_shard(dataset, task, nets[0].meta["recipe"], nets)
    return root


PLANT = {"parity": {"head.6.bias": 0.5}}   # ds1 parity networks are moved on purpose: separable


# --------------------------------------------------------------------------- splits

def test_split_rule_is_fixed_by_seed():
    # pinned: changing the rule changes every published number, so it is versioned, never edited
    assert split_seeds(range(32)) == {
        "train": [3, 6, 10, 11, 13, 16, 17, 18, 20, 26, 28, 29, 31], "val": [30],
        "test": [0, 1, 2, 4, 5, 7, 8, 9, 12, 14, 15, 19, 21, 22, 23, 24, 25, 27]}
    assert abs(split_value(0) - 0.244920) < 1e-6
    counts = split_seeds(range(20000))
    for name, share in (("test", 0.5), ("train", 0.4), ("val", 0.1)):
        assert abs(len(counts[name]) / 20000 - share) < 0.015


def test_reader_split_filters_by_the_same_rule(tmp_path):
    zoo = write_zoo(tmp_path, "ds1", ["parity", "eight_bit"], range(12))
    parts = {s: ZooDataset(zoo, split=s) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == len(ZooDataset(zoo)) == 24
    for name, part in parts.items():
        assert all(split_of(e.seed) == name for e in part.entries)
    # networks that share a seed (hence their initial weights) are on the same side
    assert {e.seed for e in parts["test"].entries if e.task == "parity"} == \
           {e.seed for e in parts["test"].entries if e.task == "eight_bit"}
    assert len(ZooDataset(zoo, split=("train", "val"))) == len(parts["train"]) + len(parts["val"])
    with pytest.raises(ValueError, match="unknown split"):
        ZooDataset(zoo, split="validation")


# --------------------------------------------------------------------------- canonicalisation

@pytest.mark.parametrize("spec,shape", [(GRU_SPEC, (4, 11, 9)), (SMALL_LSTM, (4, 11, 9)), (CONV_SPEC, (4, 1, 8, 8))],
                         ids=["gru", "lstm", "conv"])
def test_canonicalisation_and_permutations_preserve_outputs(spec, shape):
    gen = torch.Generator().manual_seed(0)
    states = [init_state_dict(spec, s) for s in range(3)]
    batch = {k: torch.stack([sd[k] for sd in states]) for k in states[0]}
    for k in batch:  # trained-looking biases too (the default init of some is tiny)
        batch[k] = batch[k] + 0.1 * torch.randn(batch[k].shape, generator=gen)
    canon = canonical.canonicalize(batch, spec)
    permuted = canonical.permute(batch, spec, gen)
    x = torch.randn(*shape, generator=gen)
    for i in range(3):
        outs = []
        for weights in (batch, canon, permuted):
            net = build(spec)
            net.load_state_dict({k: v[i] for k, v in weights.items()})
            with torch.no_grad():
                outs.append(net.eval()(x))
        assert torch.allclose(outs[1], outs[0], atol=1e-5) and torch.allclose(outs[2], outs[0], atol=1e-5)
    moved = max((permuted[k] - batch[k]).abs().max().item() for k in batch)
    assert moved > 0.01  # a permutation really moves weights
    again = canonical.canonicalize(permuted, spec)  # one canonical form per permutation class
    assert all(torch.allclose(again[k], canon[k]) for k in canon)
    norms = canonical.unit_norms(canon, canonical.unit_groups(spec)[0])
    assert bool((norms[:, :-1] >= norms[:, 1:]).all())


@pytest.mark.parametrize("spec", [GRU_SPEC, SMALL_LSTM, CONV_SPEC], ids=["gru", "lstm", "conv"])
def test_invariant_features_do_not_see_permutations_or_sign_flips(spec):
    from mlds.analysis import features
    from mlds.analysis.data import Group, from_state_dicts
    from mlds.zoo.reader import weight_layout
    gen = torch.Generator().manual_seed(1)
    layout = weight_layout(spec)
    states = [init_state_dict(spec, s) for s in range(4)]
    batch = {k: torch.stack([sd[k] for sd in states]) for k in states[0]}
    make = lambda w: Group("ds1", spec, layout, from_state_dicts(g0, w), ["a", "b"] * 2, np.arange(4),  # noqa: E731
                           np.array(["train"] * 4), [{}] * 4, ["a", "b"])
    g0 = Group("ds1", spec, layout, torch.zeros(4, layout[-1].stop), ["a", "b"] * 2, np.arange(4),
               np.array(["train"] * 4), [{}] * 4, ["a", "b"])
    plain, moved = make(batch), make(canonical.permute(batch, spec, gen))
    assert not np.allclose(features.raw(plain), features.raw(moved))
    for name in ("io", "canon"):
        assert np.allclose(features.FEATURES[name](plain), features.FEATURES[name](moved), atol=1e-6), name
    if spec["kind"] == "recurrent":  # candidate-block input rows sum to >= 0 in the canonical form
        w = canonical.canonicalize(batch, spec)["rnn.weight_ih_l0"]
        gates = canonical.GATES[spec["cell"]]
        rows = w.reshape(4, gates, spec["hidden_size"], -1)[:, canonical.CANDIDATE[spec["cell"]]]
        assert bool((rows.sum(-1) >= 0).all())


def test_canonicalisation_moves_every_gate_block_together():
    groups = canonical.unit_groups(GRU_SPEC)
    first = groups[0]
    assert [p.blocks for p in first.incoming] == [3, 3, 3, 3]
    assert [(p.name, p.axis) for p in first.outgoing] == [("rnn.weight_hh_l0", 1), ("rnn.weight_ih_l1", 1)]
    assert groups[3].outgoing[-1].name == "head.0.weight"
    assert [g.layer for g in groups[4:]] == ["head.0", "head.2", "head.4"]
    assert canonical.unit_groups(SMALL_LSTM)[0].incoming[0].blocks == 4
    assert canonical.unit_groups(CONV_SPEC)[-1].outgoing[0].name == "head.weight"
    with pytest.raises(ValueError, match="kind"):
        canonical.unit_groups({"kind": "transformer"})


@pytest.mark.parametrize("spec", [GRU_SPEC, SMALL_LSTM, CONV_SPEC], ids=["gru", "lstm", "conv"])
def test_unit_features_and_deepsets_do_not_see_hidden_unit_order(spec, tmp_path):
    import dataclasses

    from mlds.analysis.data import from_state_dicts, load_zoo
    from mlds.analysis.unit_sets import UnitSetModel, layer_views, unit_features
    write_zoo(tmp_path, "ds1", ["parity", "eight_bit"], range(6), spec=spec, shift={"parity": {}})
    group = load_zoo(tmp_path)[0]["ds1"]
    shuffled = canonical.permute(group.state_dicts(), spec, torch.Generator().manual_seed(1))  # + sign flips
    twin = dataclasses.replace(group, vectors=from_state_dicts(group, shuffled))
    assert not torch.allclose(twin.vectors, group.vectors)
    (X, layout), (X2, layout2) = unit_features(group), unit_features(twin)
    assert layout == layout2 and [units for _, units, _ in layout] == [g.size for g in canonical.unit_groups(spec)]
    for a, b in zip(layer_views(torch.as_tensor(X), layout), layer_views(torch.as_tensor(X2), layout)):
        assert not torch.allclose(a, b) or a.shape[1] == 1  # the rows moved ...
        torch.testing.assert_close(a.sort(1).values, b.sort(1).values)  # ... and are the same set of units
    model = UnitSetModel(layout, epochs=20).fit(X, np.array(group.tasks))
    np.testing.assert_allclose(model.predict_proba(X), model.predict_proba(X2), atol=1e-5)


# --------------------------------------------------------------------------- probes

def _features(n_per_class=40, signal=1.0, dims=20, seed=0):
    rng = np.random.default_rng(seed)
    seeds = np.arange(n_per_class)
    y = np.repeat([0, 1], n_per_class)
    X = rng.normal(size=(2 * n_per_class, dims))
    X[:, 0] += signal * 6 * y
    splits = np.array([split_of(s) for s in np.r_[seeds, seeds]])
    return X, y, splits


UNITS_20 = [("layer", 4, 5)]  # the 20 synthetic features read as 4 units of 5 (for deepsets)


def test_planted_signal_is_found_and_shuffled_labels_score_at_chance():
    from threadpoolctl import threadpool_limits
    X, y, splits = _features(signal=1.0)
    with threadpool_limits(1):  # OpenMP threads only add contention on these tiny fits
        for model in probes.CLASSIFIERS:
            layout = UNITS_20 if model == "deepsets" else None
            r = probes.classify(X, y, splits, model, control_repeats=6, layout=layout)
            assert r["accuracy"] >= 0.9, (model, r)
            assert abs(r["control_accuracy"] - 0.5) < 0.15, (model, r)
            d = probes.detect(X, y, splits, model, control_repeats=6, layout=layout)
            assert d["auroc"] >= 0.95 and abs(d["control_auroc"] - 0.5) < 0.15, (model, d)
    X0, y0, s0 = _features(signal=0.0, seed=1)  # nothing planted: chance
    assert abs(probes.detect(X0, y0, s0, "logreg")["auroc"] - 0.5) < 0.2
    noise = 0.1 * np.random.default_rng(2).normal(size=len(y))
    target = X[:, 0] + noise
    for model in probes.REGRESSORS:
        if model == "deepsets":  # an order-blind model sees the mean over units, not unit 0 alone
            r = probes.regress(X, X[:, ::5].mean(1) + noise / 4, splits, model, control_repeats=3, layout=UNITS_20)
        else:
            r = probes.regress(X, target, splits, model, control_repeats=3)
        assert r["r2"] > 0.8 and r["kendall_tau"] > 0.6 and r["control_r2"] < 0.2, (model, r)
        assert -1 <= r["kendall_tau"] <= 1
    # cross-validation on the training side sees the planted signal too, and only the training side
    seeds = np.r_[np.arange(40), np.arange(40)]
    assert probes.cv_score(X, y, splits, seeds, "logreg", "classify") >= 0.9
    assert probes.cv_score(X, target, splits, seeds, "ridge", "regress") > 0.8
    X_test_garbage = X.copy()
    X_test_garbage[splits == "test"] = np.nan  # the test side is never read
    assert probes.cv_score(X_test_garbage, y, splits, seeds, "logreg", "detect") >= 0.95


def test_probes_refuse_what_does_not_apply():
    X, y, splits = _features(n_per_class=3)
    one_class = np.zeros_like(y)
    with pytest.raises(probes.Skip, match="at least 2 tasks"):
        probes.classify(X, one_class, splits)
    with pytest.raises(probes.Skip, match="each class"):
        probes.detect(X[:2], y[:2], splits[:2])
    with pytest.raises(probes.Skip, match="at least 5 training"):
        probes.regress(X[:4], y[:4].astype(float), splits[:4])


# --------------------------------------------------------------------------- the whole analysis

def test_analysis_finds_planted_networks_and_writes_json_and_figures(tmp_path):
    seeds = range(24)
    zoo = tmp_path / "zoo"
    write_zoo(zoo, "ds1", ["simple_xor", "parity"], seeds, shift=PLANT, acc=lambda t, s: 0.7 + 0.01 * s)
    write_zoo(zoo, "ds2", ["parity"], seeds, shift={"parity": {"head.6.bias": 0.5, "head.4.bias": -0.3}})
    out = tmp_path / "report"
    assert main([str(zoo), "--out", str(out), "--features", "raw,stats,io,canon", "--classifiers", "logreg",
                 "--regressors", "ridge", "--control-repeats", "2", "--threads", "1"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert set(result) >= {"zoo", "splits", "task_identification", "backdoor_detection", "accuracy_prediction",
                           "canonicalisation", "skipped", "figures"}
    assert result["zoo"]["datasets"]["ds1"]["tasks"]["parity"]["networks"] == 24
    tid = result["task_identification"]["ds1/stats/logreg"]
    assert set(tid) >= {"accuracy", "chance", "n_train", "n_test"} and tid["n_test"] + tid["n_train"] == 48
    assert tid["accuracy"] == 1.0 and 0.3 <= tid["chance"] <= 0.7
    pair = result["backdoor_detection"]["ds1-vs-ds2:parity/io/logreg"]
    assert pair["auroc"] >= 0.95 and 0 <= pair["control_auroc"] <= 1
    acc = result["accuracy_prediction"]["ds1:test_acc/raw/ridge"]
    assert set(acc) >= {"r2", "kendall_tau"} and acc["r2"] <= 1 and -1 <= acc["kendall_tau"] <= 1
    assert acc["target"] == "test_acc" and len(acc["y_true"]) == len(acc["y_pred"]) == acc["n_test"]
    for r in result["task_identification"].values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["control_accuracy"] <= 1
    # the number to quote per probe: the cell chosen by cross-validation on train + val, with its test value
    chosen = result["task_identification"]["ds1/selected/cv"]
    assert chosen["cv_score"] == max(chosen["cv_scores"].values()) and set(chosen["cv_scores"]) <= {
        f"{f}/logreg" for f in ("raw", "stats", "io", "canon")}
    assert chosen["accuracy"] == result["task_identification"][f"ds1/{chosen['chosen']}"]["accuracy"]
    assert "ds1-vs-ds2:parity/selected/cv" in result["backdoor_detection"]
    assert "ds1:test_acc/selected/cv" in result["accuracy_prediction"]
    assert "<- " in summary(result)
    # ds2 holds one machine: its task identification is skipped, with the reason
    assert any(s["probe"] == "task_identification" and s["scope"] == "ds2" and "one task" in s["reason"]
               for s in result["skipped"])
    for name in ("embedding_ds1.png", "embedding_ds1_ds2.png", "loss_curves_ds1.png", "convergence.png",
                 "confusion_ds1.png", "backdoor_auroc.png"):
        assert name in result["figures"] and (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "task identification" in summary(result)


def test_bad_input_is_explained(tmp_path, capsys):
    zoo = write_zoo(tmp_path / "one", "ds1", ["parity"], range(3))
    result = analyze(zoo, tmp_path / "r1", features=["stats"], classifiers=["logreg"], regressors=["ridge"],
                     figures=False, echo=lambda s: None)
    reasons = {(s["probe"], s["scope"]): s["reason"] for s in result["skipped"]}
    assert "one task" in reasons[("task_identification", "ds1")]
    assert "at least 5 training" in reasons[("accuracy_prediction", "ds1:test_acc")]
    assert result["task_identification"] == {} and result["accuracy_prediction"] == {}
    # mixed architectures in one dataset: the smaller architecture is left out, and said so
    mixed = tmp_path / "mixed"
    write_zoo(mixed, "ds4", ["clean", "patch"], range(6), spec=CONV_SPEC)
    write_zoo(mixed, "ds4", ["blend"], range(2), spec=dict(CONV_SPEC, channels=8, name="cnn3x8"))
    result = analyze(mixed, tmp_path / "r2", features=["stats"], classifiers=["logreg"], regressors=["ridge"],
                     figures=False, echo=lambda s: None)
    assert any("cnn3x8" in s["reason"] and "not comparable" in s["reason"] for s in result["skipped"])
    assert result["zoo"]["datasets"]["ds4"]["networks"] == 12
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "r3")]) == 2
    assert "no networks" in capsys.readouterr().err


@pytest.mark.slow
def test_analyze_cli_on_a_trained_zoo(tmp_path):
    """Real (tiny) networks trained by the job, then the script as a user runs it."""
    import subprocess
    import sys

    from mlds.train.job import train_job
    from conftest import REPO
    for machine in ("single_direct", "parity"):
        train_job(compose_train(f"machine={machine}", "seeds=[0,1,2,3,4,5,6,7]", f"zoo.root={tmp_path / 'zoo'}", *TINY))
    for trojan in ("none", "patch"):
        train_job(compose_train("dataset=ds4", f"trojan={trojan}", "seeds=[0,1,3,6]", "train.max_epochs=2",
                                "train.progress=false", f"zoo.root={tmp_path / 'zoo'}"))
    proc = subprocess.run([sys.executable, "scripts/analyze.py", str(tmp_path / "zoo"), "--out", str(tmp_path / "r"),
                           "--no-tsne", "--control-repeats", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "r" / "analysis.json").read_text())
    assert {"ds1/raw/logreg", "ds4/canon/hgb"} <= set(result["task_identification"])
    assert "ds4:clean-vs-patch/stats/hgb" in result["backdoor_detection"]
    assert "task identification" in proc.stdout
