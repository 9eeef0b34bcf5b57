"""Launchers: all local cores (hydra/launcher=local, joblib) and a real SLURM cluster
(hydra/launcher=slurm, submitit).

The SLURM tests need running daemons (``bash scripts/slurm_cluster.sh start``, as
root) and run only when ``MLDS_SLURM_TESTS=1``; then an unreachable cluster is a
failure, not a skip.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from safetensors.torch import load as load_safetensors

from conftest import REPO, TINY, compose_train, run_train

SLURM_TESTS = os.environ.get("MLDS_SLURM_TESTS") == "1"
needs_slurm = pytest.mark.skipif(
    not SLURM_TESTS, reason="SLURM end-to-end tests run only with MLDS_SLURM_TESTS=1 and a running cluster "
                            "(bash scripts/slurm_cluster.sh start, as in .ci/run)")


class JobProbe:
    """Hydra callback: after each job, in the process that ran it, records the pid and
    torch's thread count to ``<out>/<pid>-<job num>.json``.  Imported by name
    (``test_launchers.JobProbe``) in the launcher's worker processes, so the tests
    put this folder on PYTHONPATH."""

    def __init__(self, out: str):
        self.out = out

    def on_job_end(self, config, job_return, **kwargs) -> None:
        Path(self.out).mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "threads": torch.get_num_threads(), "seeds": list(config.seeds or []),
                  "slurm_job": os.environ.get("SLURM_JOB_ID")}
        (Path(self.out) / f"{os.getpid()}-{config.hydra.job.num}.json").write_text(json.dumps(record))


def probe(out: Path) -> list[str]:
    return [f"+hydra.callbacks.probe._target_={__name__}.JobProbe", f"+hydra.callbacks.probe.out={out}"]


def probes(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


@pytest.fixture
def probe_path(monkeypatch):
    """Make ``test_launchers`` importable in the job processes (run_train passes os.environ on)."""
    here = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))


def stored(root: Path) -> dict[str, dict]:
    """Every sample under ``root``, read with plain webdataset (no mlds code)."""
    shards = sorted(str(p) for p in root.rglob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)} if shards else {}


def weights(sample: dict) -> dict[str, torch.Tensor]:
    return load_safetensors(sample["weights.safetensors"])


def assert_same_networks(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        wa, wb = weights(a[key]), weights(b[key])
        assert wa.keys() == wb.keys(), key
        assert all(torch.equal(wa[n], wb[n]) for n in wa), f"{key}: weights differ"


# ---------------------------------------------------------------------------------------------
# hydra/launcher=local (joblib): all cores, one torch thread per job
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_local_parallel_sweep_gives_the_same_networks_as_a_serial_one(tmp_path, probe_path):
    sweep = ["-m", "machine=single_direct,parity", "seed=range(0,4)", "population.size=2", *TINY]
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    run_train(*sweep, "hydra/launcher=basic", f"zoo.root={serial}", f"hydra.sweep.dir={tmp_path / 'sweep-serial'}")
    proc = run_train(*sweep, "hydra/launcher=local", f"zoo.root={parallel}",
                     f"hydra.sweep.dir={tmp_path / 'sweep-local'}", *probe(tmp_path / "probe"))
    assert "Joblib.Parallel(" in proc.stdout + proc.stderr
    a, b = stored(serial), stored(parallel)
    assert set(a) == {f"ds1-{m}-{s:06d}" for m in ("single_direct", "parity") for s in range(4)}
    assert_same_networks(a, b)
    for key in a:  # the same training, not just the same end point
        ma, mb = json.loads(a[key]["meta.json"]), json.loads(b[key]["meta.json"])
        assert (ma["recipe"], ma["epochs"], ma["history"], ma["metrics"]) == \
               (mb["recipe"], mb["epochs"], mb["history"], mb["metrics"])
    jobs = probes(tmp_path / "probe")
    assert sorted(tuple(j["seeds"]) for j in jobs) == sorted([(0, 1), (2, 3)] * 2)  # 4 populations
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert len({j["pid"] for j in jobs}) >= min(cores, 2)  # side by side, in worker processes
    assert {j["threads"] for j in jobs} == {1}  # one torch thread per job


# ---------------------------------------------------------------------------------------------
# hydra/launcher=slurm (submitit)
# ---------------------------------------------------------------------------------------------

def test_slurm_launcher_config_composes():
    cfg = compose_train("hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.account=proj42",
                        hydra=True)
    out = OmegaConf.to_yaml(cfg.hydra.launcher, resolve=False)
    assert "SlurmLauncher" in out and "partition: debug" in out and "account: proj42" in out
    for field in ("timeout_min:", "cpus_per_task:", "gpus_per_node:", "mem_gb:", "array_parallelism:",
                  "max_num_timeout:", "submitit_folder: ${hydra.sweep.dir}/.submitit/%j", "OMP_NUM_THREADS"):
        assert field in out, field


@pytest.mark.slow
def test_slurm_sweep_validates_every_job_before_submitting(tmp_path):
    """A bad job fails the sweep before anything is submitted (works without a cluster)."""
    sweep_dir = tmp_path / "sweep"
    proc = run_train("-m", "hydra/launcher=slurm", "machine=single_direct,flipflop", "seed=range(0,4)",
                     f"zoo.root={tmp_path / 'zoo'}", f"hydra.sweep.dir={sweep_dir}", *TINY, check=False)
    assert proc.returncode != 0
    assert "flipflop" in proc.stdout + proc.stderr
    assert not (sweep_dir / ".submitit").exists()
    assert not (tmp_path / "zoo").exists()


def slurm_reachable() -> None:
    """Fail (never skip) when the tests were asked for and the cluster does not answer."""
    for tool in ("sinfo", "sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            pytest.fail(f"MLDS_SLURM_TESTS=1 but `{tool}` is not installed (bash scripts/slurm_cluster.sh start)")
    try:
        proc = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%a %T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("MLDS_SLURM_TESTS=1 but sinfo did not answer in 30 s")
    states = proc.stdout.split()
    if proc.returncode != 0 or not states or states[0] != "up" or not any(
            s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states[1:]):
        pytest.fail(f"MLDS_SLURM_TESTS=1 but the SLURM cluster is not reachable or has no usable node in partition "
                    f"'debug' (sinfo rc={proc.returncode}: {proc.stdout.strip()} {proc.stderr.strip()}); "
                    f"start it with: bash scripts/slurm_cluster.sh start")


def submitit_tasks(sweep_dir: Path) -> list[Path]:
    """The submitted jobs' log folders: ``<sweep>/.submitit/<array job>_<task>`` (``<job>`` for a
    sweep of one job), named by the SLURM job id."""
    return sorted(p for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and list(p.glob("*_submitted.pkl")))


SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.mem_gb=1"]


def cancel_jobs(sweep_dir: Path) -> None:
    """scancel the SLURM jobs a sweep submitted (after a failed or timed-out test)."""
    if (sweep_dir / ".submitit").exists():
        for job in {t.name.split("_")[0] for t in submitit_tasks(sweep_dir)}:
            subprocess.run(["scancel", job], timeout=30)


def slurm_sweep(*overrides: str, sweep_dir: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """Run ``train.py`` through hydra/launcher=slurm; a sweep that does not end in ``timeout``
    seconds fails the test and its jobs are cancelled."""
    try:
        return run_train(*SLURM, *overrides, f"hydra.sweep.dir={sweep_dir}", check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        queue = subprocess.run(["squeue"], capture_output=True, text=True, timeout=30).stdout
        cancel_jobs(sweep_dir)
        pytest.fail(f"the SLURM sweep did not finish in {timeout} s (its jobs are cancelled); squeue:\n{queue}")


@needs_slurm
@pytest.mark.slow
def test_slurm_sweep_stores_every_network(tmp_path, probe_path):
    slurm_reachable()
    root, sweep_dir = tmp_path / "zoo", tmp_path / "sweep"
    started = time.monotonic()
    proc = slurm_sweep("machine=single_direct,parity", "seed=range(0,6)", "population.size=3", f"zoo.root={root}",
                       *TINY, *probe(tmp_path / "probe"), sweep_dir=sweep_dir)
    wall = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert set(stored(root)) == {f"ds1-{m}-{s:06d}" for m in ("single_direct", "parity") for s in range(6)}
    assert not list(root.rglob("*.partial"))
    tasks = submitit_tasks(sweep_dir)
    assert len(tasks) == 4, tasks  # 2 tasks x 6 seeds / population.size 3: one array job of 4 tasks
    assert len({t.name.split("_")[0] for t in tasks}) == 1
    for task in tasks:  # every array task left its logs here
        assert list(task.glob("*_log.out")) and list(task.glob("*_log.err")), task
    jobs = probes(tmp_path / "probe")
    assert len(jobs) == 4 and all(j["slurm_job"] for j in jobs)
    assert {j["threads"] for j in jobs} == {1}  # OMP_NUM_THREADS = cpus_per_task (1), not all host cores
    print(f"SLURM sweep: 12 networks, 4 array tasks, {wall:.1f} s")


# One job (an explicit seed list is not re-packed) that trains two populations one after the other,
# long enough (~10 s each) that a signal sent when the first is stored arrives during the second.
PARITY = ["machine=parity", "seeds=[0,1,2,3]", "population.size=2", *TINY, "train.max_epochs=150"]
PARITY_KEYS = {f"ds1-parity-{s:06d}" for s in range(4)}


@pytest.fixture(scope="module")
def parity_reference(tmp_path_factory):
    """``parity_reference()``: the PARITY networks trained serially on this host, without SLURM
    (trained on first use, so that an unreachable cluster fails the tests first)."""
    networks: dict[str, dict] = {}

    def reference() -> dict[str, dict]:
        if not networks:
            root = tmp_path_factory.mktemp("reference")
            run_train("-m", *PARITY, "train.threads=1", f"zoo.root={root}", f"hydra.sweep.dir={root / 'sweep'}")
            networks.update(stored(root))
        return networks
    return reference


def signal_during_second_population(cmd: list[str], cwd: Path, root: Path, sweep_dir: Path, sig: str):
    """Start a SLURM sweep, send ``sig`` to its job once the first population is stored; returns
    (sweep return code, its output, the job's log folder, the shards stored when the signal was sent)."""
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONWARNINGS="ignore")
    sweep = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not list(root.rglob("*.tar")):
            assert sweep.poll() is None, sweep.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "first population never stored"
            time.sleep(0.2)
        first = sorted(root.rglob("*.tar"))
        (job,) = submitit_tasks(sweep_dir)
        subprocess.run(["scancel", f"--signal={sig}", job.name], check=True, timeout=30)
        out, _ = sweep.communicate(timeout=180)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            cancel_jobs(sweep_dir)
    return sweep.returncode, out, job, first


@needs_slurm
@pytest.mark.slow
def test_slurm_preempted_job_is_requeued_and_resumes_from_the_store(tmp_path, parity_reference):
    """USR2 (submitit's preemption/time-out signal) during the job's second population: submitit
    requeues the job with the same overrides; the requeued job skips the stored population and
    trains the missing one, into the same networks as an uninterrupted serial run."""
    slurm_reachable()
    root, sweep_dir = tmp_path / "zoo", tmp_path / "sweep"
    cmd = [sys.executable, "train.py", *SLURM, *PARITY, f"zoo.root={root}", f"hydra.sweep.dir={sweep_dir}"]
    rc, out, job, first = signal_during_second_population(cmd, REPO, root, sweep_dir, "USR2")
    assert rc == 0, out[-4000:]
    log = "".join(p.read_text() for p in job.glob("*_log.*"))
    assert "this job is preempted" in log and f"Requeued job {job.name}" in log, log[-4000:]
    assert "2 of 4 networks already stored" in (sweep_dir / "0" / "train.log").read_text()
    shards = sorted(root.rglob("*.tar"))
    assert len(shards) == 2 and first[0] in shards  # the stored population was kept, not trained again
    zoo = stored(root)
    assert set(zoo) == PARITY_KEYS
    assert_same_networks(zoo, parity_reference())


@needs_slurm
@pytest.mark.slow
def test_slurm_job_killed_by_sigusr1_loses_nothing_and_a_rerun_resumes(tmp_path, parity_reference):
    """SIGUSR1 (which Lightning would otherwise take as its own SLURM requeue signal, writing
    hpc_ckpt_*.ckpt into the working directory and restoring it in every later population) ends
    the job: the sweep fails, the stored population stays, no checkpoint is left, and the same
    command again trains only the missing networks, into the reference networks."""
    slurm_reachable()
    root, sweep_dir = tmp_path / "zoo", tmp_path / "sweep"
    work = tmp_path / "work"  # the jobs' working directory (sbatch runs them where train.py was started)
    work.mkdir()
    cmd = [sys.executable, str(REPO / "train.py"), *SLURM, *PARITY, f"zoo.root={root}"]
    rc, out, job, first = signal_during_second_population(cmd + [f"hydra.sweep.dir={sweep_dir}"], work, root,
                                                          sweep_dir, "USR1")
    assert rc != 0, out[-4000:]
    assert sorted(root.rglob("*.tar")) == first and set(stored(root)) == {"ds1-parity-000000", "ds1-parity-000001"}
    assert not list(tmp_path.rglob("hpc_ckpt_*")) and not list(REPO.glob("hpc_ckpt_*"))
    rerun = slurm_sweep(*PARITY, f"zoo.root={root}", sweep_dir=tmp_path / "rerun")
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-4000:]
    assert "2 of 4 networks already stored" in (tmp_path / "rerun" / "0" / "train.log").read_text(), rerun.stdout
    zoo = stored(root)
    assert set(zoo) == PARITY_KEYS
    assert_same_networks(zoo, parity_reference())
