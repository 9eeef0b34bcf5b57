"""Faults and hostile input (issue 15): signals, unwritable roots, diverged networks, bad config values,
one source of truth for resume and status, hostile shards, symbolic links, a full disk.

Each test asserts the class of the message, the exit status where there is one, and that nothing
stored changed. The fast ones run in-process; real signals sent to a real sweep are ``slow``.
"""
import errno
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

import mlds.train.job as job_module
import mlds.zoo.store as store_module
from conftest import REPO, TINY, compose_train, run_train
from mlds.train.checks import ConfigError, validate
from mlds.train.interrupts import JobInterrupted
from mlds.train.job import train_job
from mlds.zoo.reader import ZooDataset
from mlds.zoo.release import zoo_status
from mlds.zoo.store import (CorruptShardError, LinkInStoreError, ZooStore, scan_shard, shard_keys, walk_shard)
from test_store import network, write


def digests(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> SHA-256: what "nothing stored changed" compares."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def shards_of(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ZooStore(root).shards()}


def status_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("mlds_script_status", REPO / "scripts" / "status.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stored(status) -> dict[str, int]:
    return {t.task: t.stored for t in status.datasets[0].tasks}


def cfg(root, *overrides):
    return compose_train(*TINY, "train.threads=1", f"zoo.root={root}", *overrides)


# --------------------------------------------------------------------------- signals, in-process

def test_sigterm_during_training_stops_the_job_and_a_rerun_resumes(tmp_path, monkeypatch):
    """A real SIGTERM delivered inside Lightning's training loop of the second population."""
    from mlds.train.engine import PopulationModule
    root = tmp_path / "zoo"
    populations = []
    real_module = job_module.population_module

    def counting_module(*args, **kwargs):
        populations.append(args[2])
        return real_module(*args, **kwargs)

    real_step = PopulationModule.training_step

    def step(self, *args, **kwargs):
        if len(populations) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(job_module, "population_module", counting_module)
    monkeypatch.setattr(PopulationModule, "training_step", step)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(JobInterrupted) as err:
        train_job(cfg(root, "machine=parity", "seeds=[0,1,2,3]", "population.size=2"))
    assert err.value.code == 143
    message = str(err.value)
    assert "SIGTERM" in message and "(ds1/parity seeds 2..3, 2 networks) was not stored" in message
    assert "the 2 networks this job stored are kept" in message and "run the same command again" in message
    assert "\n" not in message
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    (first,) = ZooStore(root).shards()
    assert shard_keys(first) == ["ds1-parity-000000", "ds1-parity-000001"] and ZooStore(root).partials() == []
    kept = shards_of(root)
    monkeypatch.setattr(PopulationModule, "training_step", real_step)
    populations.clear()
    again = train_job(cfg(root, "machine=parity", "seeds=[0,1,2,3]", "population.size=2"))
    assert populations == [[2, 3]] and len(again) == 1  # only the missing population
    assert {k: v for k, v in shards_of(root).items() if k in kept} == kept


def fake_population(nan_seeds=()):
    """A stand-in for train_population: synthetic networks, NaN weights for ``nan_seeds``."""
    def train(rec, task, seeds, runtime, log_dir=None):
        from mlds.train.recipe import recipe_hash
        nets = [network(task.name, s, recipe=recipe_hash(rec)) for s in seeds]
        for net in nets:
            net.meta.update(converged=False, config={})
            if net.meta["seed"] in nan_seeds:
                name = next(iter(net.weights))
                net.weights[name] = net.weights[name].clone().fill_(float("nan"))
        return nets
    return train


def test_ctrl_c_has_its_own_code_and_message(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    calls = []

    def train(rec, task, seeds, runtime, log_dir=None):
        calls.append(seeds)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal interrupts this
        return fake_population()(rec, task, seeds, runtime, log_dir)

    monkeypatch.setattr(job_module, "train_population", train)
    with pytest.raises(JobInterrupted) as err:
        train_job(cfg(root, "machine=parity", "seeds=[0,1,2,3]", "population.size=2"))
    assert err.value.code == 130 and "Ctrl-C (SIGINT)" in str(err.value) and "seeds 2..3" in str(err.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert [shard_keys(p) for p in ZooStore(root).shards()] == [["ds1-parity-000000", "ds1-parity-000001"]]


def test_a_signal_while_storing_takes_effect_after_the_shard_is_stored(tmp_path, monkeypatch):
    """The message never calls a stored population lost: storing finishes, then the job stops."""
    root = tmp_path / "zoo"
    monkeypatch.setattr(job_module, "train_population", fake_population())
    real_write = ZooStore.write_shard

    def write_shard(self, *args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_write(self, *args)

    monkeypatch.setattr(ZooStore, "write_shard", write_shard)
    with pytest.raises(JobInterrupted) as err:
        train_job(cfg(root, "machine=parity", "seeds=[0,1,2,3]", "population.size=2"))
    assert err.value.code == 143
    assert "no population of ds1/parity was in training" in str(err.value)
    assert "the 2 networks this job stored are kept" in str(err.value)
    assert [shard_keys(p) for p in ZooStore(root).shards()] == [["ds1-parity-000000", "ds1-parity-000001"]]
    assert ZooStore(root).partials() == []


def test_lightning_sigterm_exit_becomes_job_interrupted(tmp_path, monkeypatch):
    """Where another handler owns SIGTERM (submitit), Lightning ends fit() with a bare SystemExit(None),
    which would exit 0: it becomes JobInterrupted (143) too."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def fit(self, module):
        raise SIGTERMException

    monkeypatch.setattr("lightning.Trainer.fit", fit)
    with pytest.raises(JobInterrupted) as err:
        train_job(cfg(tmp_path / "zoo", "machine=parity", "seeds=[0]"))
    assert err.value.code == 143 and "seeds 0..0" in str(err.value)
    assert ZooStore(tmp_path / "zoo").shards() == []


# --------------------------------------------------------------------------- config checks before any work

def test_zoo_root_that_is_a_file_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "zoo"
    afile.write_bytes(b"not a folder")
    for root, words in ((afile, "is a file, not a folder"), (afile / "sub", "cannot be created")):
        with pytest.raises(ConfigError, match=words):
            validate(cfg(root, "machine=parity"))
    assert afile.read_bytes() == b"not a folder"


def test_read_only_zoo_root_is_refused_before_any_work(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    root.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == root else real_access(p, mode, **k))
    with pytest.raises(ConfigError, match="not writable.*read-only file system"):
        validate(cfg(root, "machine=parity"))
    monkeypatch.setattr(os, "access", real_access)
    # where the cheap check passes but writing fails (root without permission checks, odd mounts), the
    # job's probe file finds it, still before training
    monkeypatch.setattr(job_module, "train_population", lambda *a, **k: pytest.fail("trained"))

    def refuse(self, dataset, task):
        raise OSError(errno.EROFS, "Read-only file system", str(self.root))

    monkeypatch.setattr(ZooStore, "check_writable", refuse)
    with pytest.raises(ConfigError, match="cannot be written.*Read-only file system"):
        train_job(cfg(root, "machine=parity", "seeds=[0]"))
    assert list(root.iterdir()) == []


def test_write_probe_leaves_nothing(tmp_path):
    store = ZooStore(tmp_path / "zoo")
    folder = store.check_writable("ds1", "parity")
    assert folder == tmp_path / "zoo" / "ds1" / "parity" and list(folder.iterdir()) == []


@pytest.mark.parametrize("overrides, message", [
    (["automaton=100"], r"automaton=100 is outside DS3's automata 0..99.*\+allow_extra_automata=true"),
    (["automaton=foo"], "automaton must be a non-negative integer"),
    (["automaton=-1"], "automaton must be a non-negative integer"),
    (["dataset.task.automaton=150"], "automaton=150 is outside"),
])
def test_automata_outside_the_table_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg(tmp_path / "zoo", "dataset=ds3", *overrides))


def test_automata_beyond_the_table_need_an_explicit_override(tmp_path):
    validate(cfg(tmp_path / "zoo", "dataset=ds3", "automaton=100", "+allow_extra_automata=true"))
    from mlds.train.recipe import recipe
    assert "allow_extra_automata" not in json.dumps(recipe(cfg(tmp_path, "dataset=ds3", "automaton=100",
                                                               "+allow_extra_automata=true")))


# --------------------------------------------------------------------------- non-finite weights

def test_diverged_networks_are_recorded_as_failed_and_the_rest_stored(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="mlds")
    root = tmp_path / "zoo"
    monkeypatch.setattr(job_module, "train_population", fake_population(nan_seeds={1, 4, 5}))
    shards = train_job(cfg(root, "machine=parity", "seeds=[0,1,2,3,4,5]", "population.size=3"))
    assert [shard_keys(p) for p in shards] == [["ds1-parity-000000", "ds1-parity-000002"], ["ds1-parity-000003"]]
    assert "2 of 3 networks of ds1/parity have non-finite weights" in caplog.text and "seeds 4, 5" in caplog.text
    assert "were NOT stored" in caplog.text
    indexes, corrupt = ZooStore(root).index()
    assert corrupt == [] and all(torch.isfinite(t).all() for i in indexes for e in i.entries
                                 for t in store_module.read_entry(e).weights.values())
    failed = ZooStore(root).failures()
    assert [f["key"] for f in failed] == ["ds1-parity-000001", "ds1-parity-000004", "ds1-parity-000005"]
    assert all("non-finite" in f["reason"] for f in failed)
    status = zoo_status(root, ["ds1"])
    assert [f["key"] for f in status.failed] == [f["key"] for f in failed]
    assert stored(status)["parity"] == 3
    # a rerun trains the failed ones again; stored ones are not touched
    kept = shards_of(root)
    monkeypatch.setattr(job_module, "train_population", fake_population())
    again = train_job(cfg(root, "machine=parity", "seeds=[0,1,2,3,4,5]", "population.size=3"))
    assert sorted(k for p in again for k in shard_keys(p)) == ["ds1-parity-000001", "ds1-parity-000004",
                                                                 "ds1-parity-000005"]
    assert {k: v for k, v in shards_of(root).items() if k in kept} == kept
    assert zoo_status(root, ["ds1"]).failed == []  # stored since: no longer listed


def test_a_really_diverged_population_stores_nothing_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="mlds")
    root = tmp_path / "zoo"
    assert train_job(cfg(root, "machine=parity", "seeds=[0,1]", "optim.lr=1e30")) == []
    assert ZooStore(root).shards() == [] and ZooStore(root).partials() == []
    assert [f["key"] for f in ZooStore(root).failures()] == ["ds1-parity-000000", "ds1-parity-000001"]
    assert "2 of 2 networks of ds1/parity have non-finite weights" in caplog.text
    assert "none of this population is stored" in caplog.text


def test_non_finite_config_numbers_are_refused(tmp_path):
    for override in ("optim.lr=inf", "optim.lr=nan", "train.stop_loss=inf"):
        with pytest.raises(ConfigError, match="finite"):
            validate(cfg(tmp_path / "zoo", "machine=parity", override))


# --------------------------------------------------------------------------- resume and status: one truth

def _damage(shard: Path, how: str) -> None:
    with tarfile.open(shard) as tar:
        members = {m.name.split(".", 1)[1]: m for m in tar.getmembers()[:2]}
    data = bytearray(shard.read_bytes())
    if how == "invalid meta.json":
        m = members["meta.json"]
        data[m.offset_data:m.offset_data + 8] = b"!!!!!!!!"
    elif how == "flipped weights byte":
        m = members["weights.safetensors"]
        data[m.offset_data + m.size - 3] ^= 0x10
    shard.write_bytes(bytes(data))
    if how == "lacks its weights":
        samples = []
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            for m in tar.getmembers():
                if not (m.name.endswith("weights.safetensors") and m.name.startswith("ds1-parity-000000")):
                    samples.append((m, tar.extractfile(m).read()))
        shard.unlink()
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for m, payload in samples:
                tar.addfile(m, io.BytesIO(payload))


@pytest.mark.parametrize("how", ["invalid meta.json", "lacks its weights", "flipped weights byte"])
def test_resume_skips_exactly_what_status_counts(tmp_path, how, caplog):
    store = ZooStore(tmp_path)
    good = write(store, "parity", [2, 3])
    bad = write(store, "parity", [0, 1])
    _damage(bad, how)
    status = zoo_status(tmp_path, ["ds1"])
    assert [e.path for e in status.corrupt] == [str(bad)]
    counted = {e.key for i in store.index("ds1")[0] for e in i.entries}
    assert store.keys("ds1", "parity", "rcp") == counted == set(shard_keys(good))
    assert "ignoring corrupt shard" in caplog.text


def test_a_job_retrains_a_population_whose_weights_were_flipped(tmp_path, caplog):
    root = tmp_path / "zoo"
    config = cfg(root, "machine=single_invert", "seeds=[0,1]")
    (shard,) = train_job(config)
    _damage(shard, "flipped weights byte")
    again = train_job(config)
    assert len(again) == 1 and shard_keys(again[0]) == shard_keys(shard) and "ignoring corrupt shard" in caplog.text
    assert zoo_status(root, ["ds1"]).corrupt[0].path == str(shard)


def test_bytes_rotting_in_place_are_found_by_verify(tmp_path):
    """The documented place where the cheap check stops: a change that keeps size and mtime is not
    seen through the index cache; ``--verify`` reads every shard again and finds it."""
    store = ZooStore(tmp_path)
    shard = write(store, "parity", [0, 1])
    assert store.keys("ds1", "parity") == {"ds1-parity-000000", "ds1-parity-000001"}  # indexed and cached
    stat = shard.stat()
    _damage(shard, "flipped weights byte")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.keys("ds1", "parity") == {"ds1-parity-000000", "ds1-parity-000001"}  # the cache still counts it
    good, bad = store.index(verify=True)
    assert good == [] and "do not match their SHA-256" in str(bad[0])
    status = status_script()
    assert status.main(["--root", str(tmp_path), "--dataset", "ds1", "--verify", "--json"]) == 1


# --------------------------------------------------------------------------- hostile shards

def _tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _sample(seed: int = 0, meta: bytes | None = None) -> list[tuple[str, bytes]]:
    net = store_module.encode(network("parity", seed))
    return [(f"{net['__key__']}.meta.json", net["meta.json"] if meta is None else meta),
            (f"{net['__key__']}.weights.safetensors", net["weights.safetensors"])]


def _meta(**changes) -> bytes:
    meta = json.loads(store_module.encode(network("parity", 0))["meta.json"])
    meta.update(changes)
    return json.dumps(meta).encode()


HOSTILE_META = {
    "not JSON": b"{nope",
    "deeply nested": b"[" * 200000 + b"]" * 200000,
    "integer too long": b'{"dataset": "ds1", "task": "parity", "seed": ' + b"9" * 5000 + b"}",
    "seed overflows": b'{"dataset": "ds1", "task": "parity", "seed": 1e999}',
    "seed a float": _meta(seed=0.0),
    "seed a string": _meta(seed="0"),
    "epochs overflow": _meta(epochs=1e999),
    "metrics a list": _meta(metrics=[1, 2]),
    "metric a string": _meta(metrics={"test": {"acc": "high"}}),
    "input not an object": _meta(input=["x"]),
    "snapshots not epochs": _meta(snapshots="all"),
    "converged a string": _meta(converged="yes"),
    "digest not hex": _meta(weights_sha256="x" * 64),
    "not UTF-8": b'{"dataset": "\xff"}',
}


def _hostile_zoo(tmp_path: Path, name: str, members) -> tuple[Path, Path, Path]:
    root = tmp_path / "zoo"
    store = ZooStore(root)
    good = write(store, "parity", [1])
    bad = _tar(root / "ds1" / "parity" / f"ds1-parity-rcp-000000-000000-{name}.tar", members)
    return root, good, bad


@pytest.mark.parametrize("case", list(HOSTILE_META))
def test_hostile_meta_json_is_a_corrupt_shard_everywhere(tmp_path, case):
    root, good, bad = _hostile_zoo(tmp_path, "bad", _sample(meta=HOSTILE_META[case]))
    before = digests(root)
    with pytest.raises(CorruptShardError) as err:
        scan_shard(bad)
    assert err.value.path == str(bad) and err.value.offset == 512  # the meta.json data
    status = zoo_status(root, ["ds1"])
    assert [e.path for e in status.corrupt] == [str(bad)] and stored(status)["parity"] == 1
    zoo = ZooDataset(root, skip_corrupt=True)
    assert len(zoo) == 1 and zoo[0][2]["seed"] == 1 and [e.path for e in zoo.corrupt] == [str(bad)]
    with pytest.raises(CorruptShardError):
        ZooDataset(root)
    assert {k: v for k, v in digests(root).items() if not k.startswith(".index")} == \
        {k: v for k, v in before.items() if not k.startswith(".index")}


def _sparse_tar(path: Path, name: str, declared: int, typeflag: bytes = tarfile.REGTYPE, after_a_sample=False
                ) -> Path:
    """A tar with a member that declares ``declared`` bytes, written as a sparse file (holes cost no
    disk): what a hostile download can hold. ``after_a_sample``: a sound sample comes first."""
    info = tarfile.TarInfo(name)
    info.size = declared
    info.type = typeflag
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    if after_a_sample:
        sound = _tar(path.with_suffix(".sound"), _sample())
        with tarfile.open(sound) as tar:
            last = tar.getmembers()[-1]
        end = last.offset_data + last.size
        header = sound.read_bytes()[:end + (-end % 512)] + header
        sound.unlink()
    with open(path, "wb") as stream:
        stream.write(header)
        stream.seek(len(header) + declared + (-declared % 512))
        stream.write(b"\0" * 1024)
    return path


@pytest.mark.parametrize("what, typeflag, after", [("ds1-parity-000000.meta.json", tarfile.REGTYPE, False),
                                                   ("ds1-parity-000000.weights.safetensors", tarfile.REGTYPE, False),
                                                   ("././@PaxHeader", tarfile.XHDTYPE, False),
                                                   ("././@LongLink", tarfile.GNUTYPE_LONGNAME, True)])
def test_members_beyond_their_cap_are_refused_from_the_header(tmp_path, what, typeflag, after):
    root = tmp_path / "zoo"
    write(ZooStore(root), "parity", [1])
    bad = _sparse_tar(root / "ds1" / "parity" / "ds1-parity-rcp-000000-000000-huge.tar", what, 4 << 30, typeflag,
                      after)
    assert bad.stat().st_size > 4 << 30
    with pytest.raises(CorruptShardError, match="declares") as err:
        list(walk_shard(bad))
    assert err.value.path == str(bad)
    status = zoo_status(root, ["ds1"])
    assert [e.path for e in status.corrupt] == [str(bad)]
    assert len(ZooDataset(root, skip_corrupt=True)) == 1


def test_members_mlds_does_not_write_fail_verify(tmp_path, capsys):
    import pickle
    members = _sample() + [("ds1-parity-000000.pth", pickle.dumps({"a": 1}))]
    root, good, bad = _hostile_zoo(tmp_path, "pth", members)
    with pytest.raises(CorruptShardError, match="members MLDS does not write: pth"):
        list(walk_shard(bad))  # found from the headers: before anything of the sample is read
    assert status_script().main(["--root", str(root), "--dataset", "ds1", "--verify", "--json"]) == 1
    assert "members MLDS does not write" in json.loads(capsys.readouterr().out)["corrupt"][0]


def test_links_and_other_member_types_are_refused(tmp_path):
    root = tmp_path / "zoo"
    bad = root / "ds1" / "parity" / "ds1-parity-rcp-000000-000000-link.tar"
    bad.parent.mkdir(parents=True)
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("ds1-parity-000000.meta.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(CorruptShardError, match="not a plain file"):
        list(walk_shard(bad))


# --------------------------------------------------------------------------- symbolic links

def test_symlinks_in_the_store_are_never_followed(tmp_path, capsys):
    outside = tmp_path / "outside"
    elsewhere = ZooStore(outside)
    outside_shard = write(elsewhere, "parity", [5, 6])
    secret = tmp_path / "secret.txt"
    secret.write_text("not a shard")
    root = tmp_path / "zoo"
    store = ZooStore(root)
    good = write(store, "parity", [0])
    (root / "ds1" / "parity" / "ds1-parity-rcp-000005-000006-aaaaaaaa.tar").symlink_to(outside_shard)
    (root / "ds1" / "parity" / "ds1-parity-rcp-000007-000007-bbbbbbbb.tar").symlink_to(secret)
    (root / "ds1" / "single_invert").symlink_to(outside / "ds1" / "parity", target_is_directory=True)
    (root / "ds2").symlink_to(outside / "ds1", target_is_directory=True)
    outside_before = digests(outside)
    assert store.shards() == [good]
    assert store.keys("ds1", "parity") == {"ds1-parity-000000"}
    assert store.shards("ds1", "single_invert") == [] and store.shards("ds2") == []
    assert len(store.links()) == 4
    status = zoo_status(root)
    assert sum(ds.stored for ds in status.datasets) == 1 and status.corrupt == [] and len(status.links) == 4
    assert status_script().main(["--root", str(root), "--dataset", "ds1"]) == 0
    assert "4 symbolic links in the store, ignored" in capsys.readouterr().out
    assert len(ZooDataset(root)) == 1
    # never written through: a linked task folder, a linked .index, a linked .quarantine
    with pytest.raises(LinkInStoreError):
        store.write_shard("ds1", "single_invert", "rcp", [network("single_invert", 9)])
    with pytest.raises(LinkInStoreError):
        store.check_writable("ds2", "parity")
    assert digests(outside) == outside_before


def test_a_linked_index_or_quarantine_is_never_written_through(tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "zoo"
    store = ZooStore(root)
    write(store, "parity", [0])
    bad = write(store, "parity", [1])
    bad.write_bytes(bad.read_bytes()[:3000])
    (root / ".index").symlink_to(outside, target_is_directory=True)
    (root / ".quarantine").symlink_to(outside, target_is_directory=True)
    status = zoo_status(root, ["ds1"])
    assert len(status.corrupt) == 1 and "index not cached" in caplog.text
    assert list(outside.iterdir()) == []
    with pytest.raises(LinkInStoreError):
        store.quarantine(bad)
    assert bad.exists() and list(outside.iterdir()) == []
    assert status_script().main(["--root", str(root), "--dataset", "ds1", "--quarantine"]) == 2
    assert bad.exists() and list(outside.iterdir()) == []


def test_quarantine_never_replaces_a_quarantined_shard(tmp_path):
    store = ZooStore(tmp_path)
    shard = write(store, "parity", [0])
    data = shard.read_bytes()
    first = store.quarantine(shard)
    shard.write_bytes(data[:100])
    second = store.quarantine(shard)
    assert first != second and first.read_bytes() == data and second.read_bytes() == data[:100]


# --------------------------------------------------------------------------- a full disk

def test_a_full_disk_leaves_no_partial_index_files(tmp_path, monkeypatch):
    store = ZooStore(tmp_path)
    write(store, "parity", [0, 1])
    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        stream = real_open(path, mode, *args, **kwargs)
        if INDEX in str(path) and "x" in mode:
            def write(_):
                raise OSError(errno.ENOSPC, "No space left on device")
            stream.write = write
        return stream

    INDEX = store_module.INDEX_DIR
    monkeypatch.setattr(store_module, "open", full_open, raising=False)
    status = zoo_status(tmp_path, ["ds1"])
    assert stored(status)["parity"] == 2 and status.corrupt == []
    assert [p for p in (tmp_path / ".index").rglob("*") if p.is_file()] == []  # nothing half-written left


# --------------------------------------------------------------------------- status: every recipe

def test_status_counts_every_recipe(tmp_path):
    store = ZooStore(tmp_path)
    write(store, "parity", range(10))
    write(store, "parity", range(5), recipe="abl", salt=1)  # an ablation of the same keys
    write(store, "parity", [10, 11], recipe="abl", salt=1)
    (parity,) = [t for t in zoo_status(tmp_path, ["ds1"]).datasets[0].tasks if t.task == "parity"]
    assert parity.stored == 12 and parity.recipes == {"abl": 7, "rcp": 10} and parity.conflicts == 5


# --------------------------------------------------------------------------- real signals, real sweeps

def _signalled_sweep(tmp_path: Path, sig: int, launcher: list[str]):
    """Start a real sweep (3 tasks x 2 seeds, one population each, long enough: no network reaches the
    stopping loss, so every population trains its 400 epochs), send ``sig`` once the first shard is
    stored; returns (return code, stderr, shards stored at the signal, the command)."""
    root = tmp_path / "zoo"
    cmd = [sys.executable, "train.py", "-m", "machine=parity,single_invert,single_direct", "seed=range(0,2)",
           "population.size=2", *TINY, "train.max_epochs=400", "train.stop_loss=1e-9", "train.threads=1",
           f"zoo.root={root}", f"hydra.sweep.dir={tmp_path / 'sweep'}", *launcher]
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ZooStore(root).shards():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no population stored"
            time.sleep(0.05)
        time.sleep(2)  # the next population is in training (each takes several seconds)
        at_signal = shards_of(root)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C: the terminal signals the whole process group
        else:
            os.kill(proc.pid, sig)  # kill, or a scheduler signalling the sweep
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err, at_signal, cmd, root


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, words", [(signal.SIGTERM, 143, "interrupted by SIGTERM"),
                                              (signal.SIGINT, 130, "interrupted by Ctrl-C (SIGINT)")])
@pytest.mark.parametrize("launcher", [["hydra/launcher=basic"], []], ids=["basic", "local"])
def test_a_signalled_sweep_says_what_was_not_stored_and_a_rerun_resumes(tmp_path, sig, code, words, launcher):
    rc, err, at_signal, cmd, root = _signalled_sweep(tmp_path, sig, launcher)
    assert rc == code, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words in lines[0] and "not stored" in lines[0], err[-3000:]
    assert "run the same command again to resume" in lines[0] and "Traceback" not in err
    if launcher:  # in-process jobs: the message names the population
        assert "the population in training (ds1/" in lines[0]
    after = shards_of(root)
    assert {k: after.get(k) for k in at_signal} == at_signal and len(after) < 3  # nothing stored lost or changed
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    final = shards_of(root)
    assert {k: final[k] for k in after} == after and len(final) == 3
    keys = [k for p in ZooStore(root).shards() for k in shard_keys(p)]
    assert sorted(keys) == sorted(f"ds1-{m}-{s:06d}" for m in ("parity", "single_invert", "single_direct")
                                  for s in range(2))


@pytest.mark.slow
@pytest.mark.parametrize("overrides, words", [
    (["zoo.root={file}"], "is a file, not a folder"),
    (["zoo.root={file}/sub"], "cannot be created"),
    (["dataset=ds3", "automaton=100"], "outside DS3's automata 0..99"),
    (["dataset=ds3", "automaton=foo"], "automaton must be a non-negative integer"),
    (["seed=1.5"], "seeds must be non-negative integers, got [1.5]"),
    (["seed=range(0,0)"], "selects no seeds"),
    (["optim.lr=inf"], "optim.lr must be a finite"),
    (["machine=glob(zzz*)"], "no jobs"),
])
def test_bad_sweeps_end_in_one_error_line_before_any_work(tmp_path, overrides, words):
    afile = tmp_path / "afile"
    afile.write_bytes(b"mine")
    root = tmp_path / "zoo"
    overrides = [o.format(file=afile) for o in overrides]
    if not any(o.startswith("zoo.root=") for o in overrides):
        overrides.append(f"zoo.root={root}")
    proc = run_train("-m", *TINY, *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not root.exists() and afile.read_bytes() == b"mine"


@pytest.mark.slow
def test_slurm_job_stopped_by_sigterm_fails_the_sweep_in_one_line_and_a_rerun_resumes(tmp_path):
    """``scancel --signal=TERM`` during the job's second population (submitit keeps its own SIGTERM
    handler; Lightning's reaction to it becomes JobInterrupted): the sweep exits 143 with one line, the
    stored population stays, and the same command trains only the missing one."""
    from test_launchers import (PARITY, PARITY_KEYS, SLURM, needs_slurm, signal_during_second_population,
                                slurm_reachable, slurm_sweep)
    if needs_slurm.args[0]:
        pytest.skip(needs_slurm.kwargs["reason"])
    slurm_reachable()
    root, sweep_dir = tmp_path / "zoo", tmp_path / "sweep"
    cmd = [sys.executable, "train.py", *SLURM, *PARITY, f"zoo.root={root}", f"hydra.sweep.dir={sweep_dir}"]
    rc, out, job, first = signal_during_second_population(cmd, REPO, root, sweep_dir, "TERM")
    assert rc == 143, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted by SIGTERM: the population in training (ds1/parity seeds 2..3" \
        in errors[0] and "Traceback" not in out, out[-4000:]
    assert sorted(root.rglob("*.tar")) == first
    before = shards_of(root)
    rerun = slurm_sweep(*PARITY, f"zoo.root={root}", sweep_dir=tmp_path / "rerun")
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    assert {k: v for k, v in shards_of(root).items() if k in before} == before
    assert {k for p in ZooStore(root).shards() for k in shard_keys(p)} == PARITY_KEYS
