"""Snapshots along training, their reader views, packages that carry them, and proof by retraining."""
import json

import pytest
import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors

from conftest import TINY, compose_train
from mlds.nets.registry import init_state_dict
from mlds.train.job import train_job
from mlds.train.recipe import recipe, recipe_hash
from mlds.train.reproduce import check, reproduce
from mlds.zoo.reader import ZooDataset, flatten, snapshot_epochs, to_module, weights_at
from mlds.zoo.store import Network, ZooStore, read_shard

SNAP = "train.snapshots=[0,1,2]"


def stored(root):
    shards = sorted(str(p) for p in root.rglob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)}


@pytest.fixture(scope="module")
def ds1_zoo(tmp_path_factory):
    """Seeds 0..2 of ds1/parity trained together with snapshots at epochs 0, 1, 2 (max_epochs 2)."""
    root = tmp_path_factory.mktemp("traj") / "zoo"
    train_job(compose_train("machine=parity", "seeds=[0,1,2]", SNAP, f"zoo.root={root}", *TINY))
    return root


def test_snapshots_are_stored_and_start_at_the_default_init(ds1_zoo):
    samples = stored(ds1_zoo)
    assert set(samples) == {f"ds1-parity-{s:06d}" for s in range(3)}
    for key, sample in samples.items():
        meta = json.loads(sample["meta.json"])
        assert meta["snapshots"] == [0, 1, 2] and meta["population"] == [[0, 2]] and meta["device"] == "cpu"
        snaps = load_safetensors(sample["snapshots.safetensors"])  # plain safetensors, standard names
        start = {k[len("epoch_0000/"):]: v for k, v in snaps.items() if k.startswith("epoch_0000/")}
        expected = init_state_dict(meta["architecture"], meta["seed"])
        assert start.keys() == expected.keys() and all(torch.equal(start[k], expected[k]) for k in start)
        final = load_safetensors(sample["weights.safetensors"])
        last = {k[len("epoch_0002/"):]: v for k, v in snaps.items() if k.startswith("epoch_0002/")}
        assert meta["epochs"] == 2 and all(torch.equal(last[k], final[k]) for k in final)  # ran to max_epochs
        middle = {k[len("epoch_0001/"):]: v for k, v in snaps.items() if k.startswith("epoch_0001/")}
        assert any(not torch.equal(middle[k], final[k]) for k in final)


def test_snapshots_do_not_change_the_network_or_its_identity(ds1_zoo, tmp_path):
    root = tmp_path / "plain"
    train_job(compose_train("machine=parity", "seeds=[0,1,2]", f"zoo.root={root}", *TINY))
    with_snaps, without = stored(ds1_zoo), stored(root)
    for key in without:
        assert with_snaps[key]["weights.safetensors"] == without[key]["weights.safetensors"]
        assert json.loads(with_snaps[key]["meta.json"])["recipe"] == json.loads(without[key]["meta.json"])["recipe"]
    assert recipe_hash(recipe(compose_train(SNAP))) == recipe_hash(recipe(compose_train()))


def test_snapshots_alone_and_in_a_population_are_the_same(ds1_zoo, tmp_path):
    root = tmp_path / "alone"
    train_job(compose_train("machine=parity", "seeds=[1]", SNAP, f"zoo.root={root}", *TINY))
    alone = load_safetensors(stored(root)["ds1-parity-000001"]["snapshots.safetensors"])
    crowd = load_safetensors(stored(ds1_zoo)["ds1-parity-000001"]["snapshots.safetensors"])
    assert alone.keys() == crowd.keys()
    assert max((alone[k] - crowd[k]).abs().max().item() for k in alone) < 1e-5


def test_a_network_that_stopped_early_keeps_the_snapshots_it_reached(tmp_path):
    root = tmp_path / "zoo"
    train_job(compose_train("machine=single_direct", "seeds=[4]", "train.snapshots=[0,1,2]", "train.stop_loss=100",
                            f"zoo.root={root}", *TINY))
    meta = json.loads(stored(root)["ds1-single_direct-000004"]["meta.json"])
    assert meta["converged"] and meta["epochs"] == 1 and meta["snapshots"] == [0, 1]


def test_reader_snapshot_views(ds1_zoo):
    zoo = ZooDataset(ds1_zoo, snapshot=1)
    assert len(zoo) == 3
    vector, _, meta = zoo[0]
    net = ZooDataset(ds1_zoo).network(0, snapshots=True)
    assert snapshot_epochs(net) == [0, 1, 2]
    assert torch.equal(vector, flatten(weights_at(net, 1), zoo.layout))
    module = to_module(net, epoch=0)
    start = init_state_dict(meta["architecture"], meta["seed"])
    assert all(torch.equal(module.state_dict()[k], start[k]) for k in start)
    assert len(ZooDataset(ds1_zoo, snapshot=5)) == 0  # no network has epoch 5
    with pytest.raises(KeyError, match="no snapshot of epoch 7"):
        weights_at(net, 7)


def test_packages_carry_snapshots(tmp_path):
    """A release of networks with snapshots keeps them byte for byte, and the card says which epochs."""
    from mlds.zoo.release import build_package, verify_package
    from test_store import network

    store = ZooStore(tmp_path / "zoo")
    for task in ("single_direct", "single_invert", "simple_xor", "eight_bit", "parity"):
        nets = []
        for seed in range(100):
            net = network(task, seed)
            snaps = {f"epoch_0000/{k}": v - 1 for k, v in net.weights.items()}
            nets.append(Network(net.key, net.weights, {**net.meta, "snapshots": [0]}, snaps))
        store.write_shard("ds1", task, "rcp", nets)
    package = build_package(tmp_path / "zoo", "ds1", 100, tmp_path / "out")
    assert verify_package(package).ok
    assert "the weights after epochs 0" in (package / "README.md").read_text()
    assert json.loads((package / "manifest.json").read_text())["snapshot_epochs"] == [0]
    zoo = ZooDataset(package, snapshot=0)
    vector, _, meta = zoo[0]
    assert len(zoo) == 500 and torch.equal(vector, flatten({k: v - 1 for k, v in network(meta["task"], meta["seed"]).weights.items()}, zoo.layout))


@pytest.mark.parametrize("overrides", [
    ["dataset=ds1", "machine=parity"],
    ["dataset=ds2", "machine=eight_bit"],
    ["dataset=ds3", "automaton=5", "data.n_train=64", "train.max_epochs=1"],
])
def test_reproduce_from_meta_alone(tmp_path, overrides):
    root = tmp_path / "zoo"
    train_job(compose_train(*TINY, *overrides, "seeds=[2,3]", "train.snapshots=[0,1]", f"zoo.root={root}"))
    stored_nets = [n for shard in ZooStore(root).shards() for n in read_shard(shard)]
    zoo = ZooDataset(root)
    results = reproduce([zoo.network(i, snapshots=True) for i in range(len(zoo))])
    assert [r.passed for r in results] == [True, True] and all(r.identical and r.max_weight_diff == 0 for r in results)
    assert len(stored_nets) == 2


def test_reproduce_fails_clearly_when_a_stored_weight_is_altered(ds1_zoo, tmp_path, capsys):
    zoo = ZooDataset(ds1_zoo)
    net = zoo.network(1, snapshots=True)
    tampered = {k: v.clone() for k, v in net.weights.items()}
    tampered["head.6.bias"][0] += 0.25
    store = ZooStore(tmp_path / "zoo")
    store.write_shard("ds1", "parity", net.meta["recipe"], [Network(net.key, tampered, net.meta, net.snapshots)])
    (result,) = reproduce([ZooDataset(tmp_path / "zoo").network(0, snapshots=True)])
    assert not result.passed and not result.identical and result.max_weight_diff == pytest.approx(0.25, abs=1e-3)
    assert "bitwise identity expected" in "; ".join(result.notes)
    from rich.console import Console
    assert check(str(tmp_path / "zoo"), [net.key], None, 0, "cpu", None, Console(width=200)) == 1
    assert "DOES NOT reproduce" in capsys.readouterr().out
    assert check(str(ds1_zoo), ["ds1-parity-000099"], None, 0, "cpu", None, Console(width=200)) == 2


def test_population_seeds_are_recorded_as_runs():
    from mlds.train.job import expand_seed_ranges, seed_ranges

    assert seed_ranges([0, 1, 2, 5, 7, 8]) == [[0, 2], [5, 5], [7, 8]]
    assert expand_seed_ranges(seed_ranges([3, 4, 9, 2])) == [3, 4, 9, 2]  # order kept
    assert seed_ranges(list(range(16384))) == [[0, 16383]]
