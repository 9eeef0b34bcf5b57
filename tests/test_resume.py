"""Resume: a sweep trains only what the store lacks, and survives kill -9. Sweep progress."""
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.mlds_population_sweeper.population_sweeper import pack
from mlds.train.progress import SweepProgress, format_seconds, start_sweep
from mlds.zoo.release import zoo_status
from mlds.zoo.store import ZooStore, shard_keys
from mlds.train.job import train_job

REPO = Path(__file__).resolve().parent.parent
TINY = ["data.n_train=64", "data.n_val=32", "data.n_test=32", "train.max_epochs=2", "train.progress=false"]


def config(root, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[*TINY, "train.threads=1", f"zoo.root={root}", *overrides])


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ZooStore(root).shards()}


def test_rerun_trains_only_missing_seeds(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mlds")
    root = tmp_path / "zoo"
    first = train_job(config(root, "machine=parity", "seeds=[1,2]", "population.size=4"))
    assert len(first) == 1 and shard_keys(first[0]) == ["ds1-parity-000001", "ds1-parity-000002"]
    before = digests(root)
    # the job of seeds 0..3 shrinks to one population of the missing seeds 0 and 3
    shards = train_job(config(root, "machine=parity", "seeds=[0,1,2,3]", "population.size=4"))
    assert len(shards) == 1 and shard_keys(shards[0]) == ["ds1-parity-000000", "ds1-parity-000003"]
    assert shards[0].name.startswith("ds1-parity-") and "-000000-000003-" in shards[0].name
    assert "2 of 4 networks already stored" in caplog.text
    after = digests(root)
    assert {k: after[k] for k in before} == before  # stored shards untouched
    # everything stored: nothing trained, nothing written
    assert train_job(config(root, "machine=parity", "seeds=[0,1,2,3]", "population.size=4")) == []
    assert digests(root) == after
    # a different recipe is a different network: trained again
    other = train_job(config(root, "machine=parity", "seeds=[0]", "train.max_epochs=1"))
    assert len(other) == 1 and len(digests(root)) == 3


def test_a_corrupt_shard_is_trained_again(tmp_path, caplog):
    root = tmp_path / "zoo"
    cfg = config(root, "machine=single_invert", "seeds=[0,1,2]", "population.size=3")
    shard = train_job(cfg)[0]
    shard.write_bytes(shard.read_bytes()[:4000])
    again = train_job(cfg)
    assert "ignoring corrupt shard" in caplog.text
    assert len(again) == 1 and len(shard_keys(again[0])) == 3
    status = zoo_status(root, ["ds1"])
    assert len(status.corrupt) == 1 and status.datasets[0].tasks[1].stored == 3


def test_sweep_progress_is_shared_by_jobs(tmp_path):
    folder = start_sweep(tmp_path / "sweep", total=10, jobs=5)
    job_a, job_b = SweepProgress.open(folder), SweepProgress.open(folder)
    job_a.record("stored", 4)
    job_a.record("start", 0)
    job_b.record("start", 0)
    time.sleep(0.05)
    job_b.record("trained", 2)
    snap = job_a.snapshot()
    assert (snap.total, snap.done, snap.stored, snap.trained, snap.populations) == (10, 6, 4, 2, 1)
    assert snap.rate > 0 and snap.eta == pytest.approx(4 / snap.rate, rel=0.2)
    assert "sweep 6/10 networks (60%)" in job_b.line() and "ETA 0:00:0" in job_b.line()
    job_a.record("trained", 4)
    assert job_b.snapshot().done == 10 and job_b.snapshot().eta == 0
    assert SweepProgress.open(tmp_path / "nothing") is None
    assert format_seconds(3725) == "1:02:05" and format_seconds(None) == "--:--:--"


def test_sweeper_counts_the_networks_of_a_sweep():
    parse = OverridesParser.create().parse_overrides
    packing = pack(parse(["machine=parity,eight_bit", "seed=range(0,5)"]), 2)
    assert packing.networks == 10 and len(packing.jobs) == 6
    assert packing.jobs[2] == ["machine=parity", "seeds=[4]"]
    assert pack(parse(["machine=parity"]), 2) == (  # no seed sweep: one job, the config's seed
        [["machine=parity"]], 1)


def test_small_sweeps_are_split_so_that_every_worker_has_a_job():
    parse = OverridesParser.create().parse_overrides
    assert [len(j[-1].split(",")) for j in pack(parse(["seed=range(0,16)"]), 64, workers=4).jobs] == [4] * 4
    quickstart = pack(parse(["machine=a,b,c,d,e", "seed=range(0,16)"]), 16, workers=2)
    assert len(quickstart.jobs) == 5 and quickstart.networks == 80  # already enough jobs: unchanged
    assert len(pack(parse(["machine=a,b", "seed=range(0,3)"]), 64, workers=8).jobs) == 6  # one seed per job at most
    big = pack(parse(["seed=range(0,500)"]), 64, workers=2)
    assert len(big.jobs) == 8 and big.networks == 500


def _sweep_command(root: Path, sweep_dir: Path) -> list[str]:
    return [sys.executable, "train.py", "-m", "hydra/launcher=basic", "dataset=ds1", "machine=parity,single_invert",
            "seed=range(0,8)",
            "population.size=2", *TINY, "train.threads=1", f"zoo.root={root}", f"hydra.sweep.dir={sweep_dir}"]


@pytest.mark.slow
def test_sweep_killed_with_sigkill_resumes_without_losing_or_retraining(tmp_path):
    root, sweep_dir = tmp_path / "zoo", tmp_path / "sweep"
    cmd = _sweep_command(root, sweep_dir)
    env = dict(os.environ, HYDRA_FULL_ERROR="1", PYTHONWARNINGS="ignore")
    with open(tmp_path / "run1.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 120
        while not ZooStore(root).shards() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-sweep: at least one shard exists
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "run1.log").read_text()[-3000:]
    survivors = digests(root)
    assert 1 <= len(survivors) < 8, "the kill must land after the first shard and before the sweep ends"
    before = {p.name: set(shard_keys(p)) for p in ZooStore(root).shards()}

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = rerun.stdout + rerun.stderr

    store = ZooStore(root)
    after = digests(root)
    assert {name: after.get(name) for name in survivors} == survivors  # present and byte-identical
    keys = [k for p in store.shards() for k in shard_keys(p)]
    expected = {f"ds1-{m}-{s:06d}" for m in ("parity", "single_invert") for s in range(8)}
    assert sorted(keys) == sorted(expected)  # every network exactly once
    old_keys = set().union(*before.values())
    new_keys = [k for p in store.shards() if p.name not in survivors for k in shard_keys(p)]
    assert not old_keys & set(new_keys) and set(new_keys) == expected - old_keys  # none retrained
    indexes, corrupt = store.index(verify=True)
    assert corrupt == [] and sum(len(i.entries) for i in indexes) == 16
    status = zoo_status(root, ["ds1"])
    assert {t.task: t.stored for t in status.datasets[0].tasks if t.stored} == {"single_invert": 8, "parity": 8}
    # progress: one line per population with sweep-wide done/total and an ETA
    lines = [line for line in out.splitlines() if "stored" in line and "| sweep " in line]
    skipped = [line for line in lines if "2 of 2 networks already stored" in line]
    assert len(skipped) == len(survivors) and len(lines) - len(skipped) == 8 - len(survivors)
    assert "sweep 16/16 networks (100%)" in lines[-1] and "ETA 0:00:00" in lines[-1]


@pytest.mark.slow
def test_two_sweeps_into_one_store_at_once(tmp_path):
    """Two identical sweeps race on one store: no shard is clobbered, every network is there once
    (a network both trained is an identical duplicate, kept once), and nothing conflicts."""
    from mlds.zoo.store import build_catalog
    root = tmp_path / "zoo"
    env = dict(os.environ, HYDRA_FULL_ERROR="1", PYTHONWARNINGS="ignore")
    procs = []
    for name in ("a", "b"):
        cmd = [sys.executable, "train.py", "-m", "hydra/launcher=basic", "machine=parity", "seed=range(0,6)",
               "population.size=2", *TINY,
               "train.threads=1", f"zoo.root={root}", f"hydra.sweep.dir={tmp_path / name}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env))
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    store = ZooStore(root)
    indexes, corrupt = store.index(verify=True)
    assert corrupt == [] and store.partials() == []
    copies = sum(len(i.entries) for i in indexes)
    assert 6 <= copies <= 12 and len(store.shards()) == copies // 2
    catalog = build_catalog(indexes)
    assert sorted(catalog.networks[("ds1", "parity")]) == list(range(6))
    assert catalog.conflicts == {} and catalog.duplicates == copies - 6
