"""mlds.zoo.reader: stock WebDataset iteration, the ZooDataset of weight vectors, and ready modules."""
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from mlds.nets.registry import build, init_state_dict
from mlds.zoo.reader import (ZooDataset, collate, decode, flatten, shard_paths, to_module, unflatten, weight_layout,
                         webdataset)
from mlds.zoo.store import CorruptShardError, ZooStore
from test_store import SPEC, write


@pytest.fixture
def zoo(tmp_path):
    store = ZooStore(tmp_path / "zoo")
    write(store, "parity", range(0, 4))
    write(store, "parity", range(4, 8))
    write(store, "single_direct", range(0, 6))
    write(store, "single_direct", range(2, 4))  # identical duplicates: kept once
    return tmp_path / "zoo"


def test_vector_layout_is_fixed_state_dict_order():
    layout = weight_layout(SPEC)
    names = list(build(SPEC).state_dict())
    assert [s.name for s in layout] == names
    assert names[:4] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
    assert names[-2:] == ["head.6.weight", "head.6.bias"]
    assert layout[0].start == 0 and all(a.stop == b.start for a, b in zip(layout, layout[1:]))
    assert layout[-1].stop == 4364
    weights = init_state_dict(SPEC, 11)
    vector = flatten(weights, layout)
    assert vector.dtype == torch.float32 and vector.shape == (4364,)
    assert torch.equal(vector[:216], weights["rnn.weight_ih_l0"].reshape(-1))
    back = unflatten(vector, layout)
    assert all(torch.equal(back[k], weights[k]) for k in weights)
    with pytest.raises(ValueError):
        flatten({k: v for k, v in weights.items() if k != "head.6.bias"}, layout)


def test_same_network_gives_same_vector(zoo, tmp_path):
    a = ZooDataset(zoo)
    b = ZooDataset(zoo, tasks=["parity"], seeds=range(2, 8))
    va, _, ma = a[a.entries.index(next(e for e in a.entries if e.key == "ds1-parity-000003"))]
    vb, _, mb = b[[e.key for e in b.entries].index("ds1-parity-000003")]
    assert torch.equal(va, vb) and ma == mb
    assert torch.equal(va, flatten(init_state_dict(SPEC, 3), a.layout))
    # the same network stored again in another shard gives the same vector too
    write(ZooStore(tmp_path / "other"), "parity", [3])
    vc, _, _ = ZooDataset(tmp_path / "other")[0]
    assert torch.equal(va, vc)


def test_filters_labels_and_order(zoo):
    everything = ZooDataset(zoo)
    assert len(everything) == 8 + 6  # the duplicated seeds 2, 3 of single_direct count once
    assert everything.classes == ["single_direct", "single_invert", "simple_xor", "eight_bit", "parity"]
    keys = [e.key for e in everything.entries]
    assert keys[0] == "ds1-single_direct-000000" and keys[-1] == "ds1-parity-000007"
    parity = ZooDataset(zoo, tasks=["parity"], converged=True, seeds=(0, 6))
    assert [e.seed for e in parity.entries] == [0, 2, 4]
    _, label, meta = parity[1]
    assert label == 4 and meta["seed"] == 2 and meta["converged"] is True  # labels do not depend on filters
    assert [e.seed for e in ZooDataset(zoo, where=lambda e: e.seed in (1, 7)).entries] == [1, 1, 7]
    assert ZooDataset(zoo, converged=True, label="converged")[0][1] == 1
    assert ZooDataset(zoo, label=lambda meta: meta["seed"] * 10)[3][1] == 30
    loader = DataLoader(everything, batch_size=5, shuffle=True, collate_fn=collate)
    vectors, labels, metas = next(iter(loader))
    assert vectors.shape == (5, 4364) and labels.shape == (5,) and len(metas) == 5


def test_to_module_builds_a_plain_module_with_the_weights(zoo):
    ds = ZooDataset(zoo, tasks=["parity"])
    net = ds.network(5)
    module = to_module(net)
    reference = build(SPEC)
    reference.load_state_dict(init_state_dict(SPEC, 5))
    x = torch.randn(2, 7, 9)
    assert type(module).__name__ == "RecurrentNet" and not module.training
    assert torch.equal(module(x), reference.eval()(x))
    vector, _, meta = ds[5]
    assert torch.equal(to_module((vector, meta))(x), module(x))


def test_stock_webdataset_iterates_a_zoo(zoo):
    paths = shard_paths(zoo)
    assert len(paths) == 4
    nets = list(wds.WebDataset(paths, shardshuffle=False).map(decode))
    assert len(nets) == 16  # every stored copy, in shard order
    assert [n.key for n in webdataset(zoo)] == [n.key for n in nets]


def test_webdataset_reader_names_file_and_offset_of_a_truncated_shard(zoo):
    paths = shard_paths(zoo)
    bad = paths[1]
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[:5000])
    with pytest.raises(CorruptShardError) as err:
        list(webdataset(zoo))
    assert err.value.path == bad and err.value.offset >= 0
    good = list(webdataset(zoo, skip_corrupt=True))
    assert len(good) == 12
    with pytest.raises(CorruptShardError) as err:  # even without the header pre-check
        list(webdataset([bad], check=False))
    assert bad in str(err.value) and err.value.offset >= 0
    with pytest.raises(CorruptShardError):
        ZooDataset(zoo)
    assert len(ZooDataset(zoo, skip_corrupt=True)) == 4 + 6  # parity 4..7 are lost with the shard


def test_conflicting_versions_are_reported(zoo):
    write(ZooStore(zoo), "parity", [1], salt=3)
    with pytest.raises(ValueError, match="ds1-parity-000001"):
        ZooDataset(zoo)
    ds = ZooDataset(zoo, on_conflict="first")
    assert len(ds) == 14


@pytest.mark.slow
def test_reading_a_zoo_imports_neither_lightning_nor_hydra():
    """A researcher who only reads zoos pays for neither (a fresh interpreter: pytest has both loaded)."""
    import subprocess
    import sys

    code = ("import sys, mlds.zoo.store, mlds.zoo.reader, mlds.zoo.release, mlds.datasets, mlds.nets.registry; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'hydra', "
            "'omegaconf'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
