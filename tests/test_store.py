"""The zoo store: atomic shards, corrupt-shard detection, concurrent writers, duplicates and conflicts."""
import io
import json
import multiprocessing
import os
import pickle
import tarfile

import pytest
import torch

from mlds.nets.registry import init_state_dict
from mlds.zoo.store import (CorruptShardError, Network, ZooStore, build_catalog, read_shard, sample_key, scan_shard,
                        shard_keys, walk_shard)

from conftest import GRU_SPEC as SPEC


def network(task: str, seed: int, dataset: str = "ds1", recipe: str = "rcp", salt: int = 0) -> Network:
    """A synthetic stored network: the initial weights of ``seed`` (+ ``salt`` to make a different version)."""
    weights = init_state_dict(SPEC, seed)
    if salt:
        weights = {k: v + salt for k, v in weights.items()}
    meta = {"dataset": dataset, "task": task, "seed": seed, "recipe": recipe, "converged": seed % 2 == 0,
            "epochs": 3, "architecture": {"param_count": 4364, **SPEC},
            "metrics": {"test": {"loss": 0.5, "acc": 0.75}}}
    return Network(sample_key(dataset, task, seed), weights, meta)


def write(store: ZooStore, task: str, seeds, **kw):
    nets = [network(task, s, **kw) for s in seeds]
    return store.write_shard(nets[0].meta["dataset"], task, nets[0].meta["recipe"], nets)


def test_shard_roundtrip_layout_and_no_leftovers(tmp_path):
    store = ZooStore(tmp_path)
    shard = write(store, "parity", [3, 4, 5])
    assert shard.parent == tmp_path / "ds1" / "parity"
    assert shard.name.startswith("ds1-parity-rcp-000003-000005-") and shard.name.endswith(".tar")
    assert os.listdir(shard.parent) == [shard.name]  # no partial file left behind
    assert shard_keys(shard) == ["ds1-parity-000003", "ds1-parity-000004", "ds1-parity-000005"]
    nets = list(read_shard(shard))
    assert [n.meta["seed"] for n in nets] == [3, 4, 5]
    expected = init_state_dict(SPEC, 4)
    assert all(torch.equal(nets[1].weights[k], expected[k]) for k in expected)
    assert len(nets[1].meta["weights_sha256"]) == 64
    assert store.keys("ds1", "parity", "rcp") == {n.key for n in nets}
    assert store.keys("ds1", "parity", "other") == set()
    # stock tar tools see plain members
    with tarfile.open(shard) as tar:
        assert tar.getnames()[:2] == ["ds1-parity-000003.meta.json", "ds1-parity-000003.weights.safetensors"]


def test_keys_with_dots_or_dashes_are_refused():
    with pytest.raises(ValueError):
        sample_key("ds1", "par.ity", 1)
    with pytest.raises(ValueError):
        sample_key("ds1", "par-ity", 1)


def test_hidden_and_partial_files_are_never_shards(tmp_path):
    store = ZooStore(tmp_path)
    shard = write(store, "parity", [0, 1])
    folder = shard.parent
    data = shard.read_bytes()
    (folder / f".{shard.name[:-4]}-x.tar.partial").write_bytes(data[:5000])  # a killed writer's leftover
    (folder / ".hidden.tar").write_bytes(data)
    (tmp_path / ".quarantine" / "ds1" / "parity").mkdir(parents=True)
    (tmp_path / ".quarantine" / "ds1" / "parity" / "old.tar").write_bytes(data)
    assert store.shards() == [shard]
    assert len(store.partials()) == 1 and store.partials(min_age_s=3600) == []
    assert store.remove_partials(min_age_s=0) and store.partials() == []
    assert store.shards() == [shard]


def test_publish_never_replaces_an_existing_shard(tmp_path):
    from mlds.zoo.store import publish
    (tmp_path / "a.partial").write_bytes(b"new")
    (tmp_path / "a.tar").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        publish(tmp_path / "a.partial", tmp_path / "a.tar")
    assert (tmp_path / "a.tar").read_bytes() == b"old"


def _cuts(data: bytes) -> dict[str, int]:
    offsets = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
            offsets.append((info.offset, info.offset_data, info.size))
    second_sample = offsets[2][0]
    last_end = offsets[-1][1] + offsets[-1][2]
    return {"inside the first header": 300, "inside weights data": offsets[1][1] + 1000,
            "at a sample boundary": second_sample,
            "just before the end-of-archive marker": last_end + (-last_end % 512)}


@pytest.mark.parametrize("where", ["inside the first header", "inside weights data", "at a sample boundary",
                                   "just before the end-of-archive marker"])
def test_truncated_shard_names_file_and_offset(tmp_path, where):
    store = ZooStore(tmp_path)
    shard = write(store, "parity", [0, 1, 2])
    data = shard.read_bytes()
    cut = _cuts(data)[where]
    shard.write_bytes(data[:cut])
    with pytest.raises(CorruptShardError) as err:
        list(read_shard(shard))
    assert err.value.path == str(shard) and str(shard) in str(err.value)
    assert 0 <= err.value.offset <= cut and f"offset {err.value.offset}" in str(err.value)
    for check in (shard_keys, scan_shard):
        with pytest.raises(CorruptShardError):
            check(shard)


@pytest.mark.parametrize("what", ["weights", "meta", "header"])
def test_corrupted_bytes_are_found(tmp_path, what):
    store = ZooStore(tmp_path)
    shard = write(store, "parity", [0, 1, 2])
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    meta, weights = members[2], members[3]  # second sample
    pos = {"weights": weights.offset_data + 700, "meta": meta.offset_data, "header": weights.offset + 10}[what]
    data[pos] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError) as err:
        list(read_shard(shard))
    expected = {"weights": weights.offset_data, "meta": meta.offset_data, "header": weights.offset}[what]
    assert err.value.offset == expected
    # the first sample, before the defect, was readable
    seen = []
    with pytest.raises(CorruptShardError):
        for net in read_shard(shard):
            seen.append(net.key)
    assert seen == ["ds1-parity-000000"]


def test_a_corrupt_shard_is_not_counted_and_the_others_stay_readable(tmp_path, caplog):
    store = ZooStore(tmp_path)
    good = [write(store, "parity", [s, s + 1]) for s in (0, 2, 4)]
    bad = good[1]
    bad.write_bytes(bad.read_bytes()[:3000])
    indexes, corrupt = store.index("ds1")
    assert sorted(i.path for i in indexes) == [good[0], good[2]]
    assert len(corrupt) == 1 and corrupt[0].path == str(bad)
    assert store.keys("ds1", "parity") == {sample_key("ds1", "parity", s) for s in (0, 1, 4, 5)}
    assert "corrupt shard" in caplog.text
    catalog = build_catalog(indexes, corrupt)
    assert sorted(catalog.networks[("ds1", "parity")]) == [0, 1, 4, 5]
    moved = store.quarantine(bad)
    assert moved.exists() and store.shards() == [good[0], good[2]]


def test_index_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    import mlds.zoo.store as store_module
    store = ZooStore(tmp_path)
    write(store, "parity", [0, 1])
    first, _ = store.index()
    assert (tmp_path / ".index").is_dir()
    calls = []
    real = store_module.scan_shard
    monkeypatch.setattr(store_module, "scan_shard", lambda *a, **k: calls.append(a) or real(*a, **k))
    again, _ = store.index()
    assert calls == [] and [e.key for e in again[0].entries] == [e.key for e in first[0].entries]
    write(store, "parity", [2])
    store.index()
    assert len(calls) == 1  # only the new shard was read
    store.index(verify=True)
    assert len(calls) == 3  # verify reads everything


def _writer(root, task, seeds, salt, rounds):
    store = ZooStore(root)
    for _ in range(rounds):
        for s in seeds:
            write(store, task, [s], salt=salt)


def test_concurrent_writers_do_not_clobber_each_other(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    # two writers store the same seeds 0..5 (identical networks), a third stores seed 3 differently
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), "parity", range(6), 0, 3)) for _ in range(2)]
    procs.append(ctx.Process(target=_writer, args=(str(tmp_path), "parity", [3], 7, 1)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = ZooStore(tmp_path)
    shards = store.shards()
    assert len(shards) == 2 * 3 * 6 + 1  # every write is its own shard, none replaced
    indexes, corrupt = store.index(verify=True)
    assert corrupt == [] and sum(len(i.entries) for i in indexes) == 37
    catalog = build_catalog(indexes)
    assert sorted(catalog.networks[("ds1", "parity")]) == list(range(6))  # each network once
    assert catalog.duplicates == 5 * 5  # 6 identical copies of each seed but 3 are kept once; seed 3 conflicts
    assert list(catalog.conflicts) == ["ds1-parity-000003"]
    assert len(catalog.conflicts["ds1-parity-000003"]) == 7
    assert store.partials() == []


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MLDS_PWNED', '/tmp/mlds-pwned')}",))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    import webdataset as wds

    from mlds.zoo.reader import ZooDataset, webdataset
    flag = tmp_path / "pwned"
    monkeypatch.setenv("MLDS_PWNED", str(flag))
    store = ZooStore(tmp_path / "zoo")
    shard = write(store, "parity", [0])
    # rewrite the shard with an extra pickle entry next to the regular ones
    sample = next(iter(wds.WebDataset(str(shard), shardshuffle=False)))
    evil = shard.with_name("ds1-parity-rcp-000000-000000-evil.tar")
    with wds.TarWriter(str(evil), encoder=False) as writer:
        writer.write({"__key__": sample["__key__"], "meta.json": sample["meta.json"],
                      "weights.safetensors": sample["weights.safetensors"], "pyd": pickle.dumps(_Boom()),
                      "pth": pickle.dumps(_Boom())})
    for read in (lambda: list(read_shard(evil)), lambda: scan_shard(evil, verify=True),
                 lambda: list(webdataset(evil))):
        with pytest.raises(CorruptShardError, match="members MLDS does not write: pth, pyd"):
            read()
    zoo = ZooDataset(tmp_path / "zoo", skip_corrupt=True)  # the sound shard stays readable
    zoo[0]
    assert [e.path for e in zoo.corrupt] == [str(evil)]
    assert not flag.exists()


def test_walk_reports_non_contiguous_keys(tmp_path):
    import webdataset as wds
    path = tmp_path / "x.tar"
    with wds.TarWriter(str(path), encoder=False) as writer:
        writer.write({"__key__": "ds1-parity-000000", "meta.json": b"{}"})
        writer.write({"__key__": "ds1-parity-000001", "meta.json": b"{}"})
        writer.write({"__key__": "ds1-parity-000000", "weights.safetensors": b"x"})
    with pytest.raises(CorruptShardError, match="not contiguous"):
        list(walk_shard(path))


def test_meta_must_match_its_key(tmp_path):
    store = ZooStore(tmp_path)
    net = network("parity", 1)
    net.meta["seed"] = 2
    shard = store.write_shard("ds1", "parity", "rcp", [net])
    with pytest.raises(CorruptShardError, match="describes"):
        scan_shard(shard)


def test_meta_json_roundtrip_is_plain_json(tmp_path):
    shard = write(ZooStore(tmp_path), "parity", [0])
    with tarfile.open(shard) as tar:
        meta = json.load(tar.extractfile("ds1-parity-000000.meta.json"))
    assert meta["seed"] == 0 and meta["recipe"] == "rcp"
