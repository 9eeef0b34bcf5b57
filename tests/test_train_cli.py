"""Training jobs end to end: sweep, store, load into plain PyTorch, bad input. The jobs run in-process
(``train_job`` on a composed config, what ``train.py`` calls); the real CLI runs in the ``slow`` tests."""
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from safetensors.torch import load as load_safetensors

from conftest import TINY, compose_train, run_train
from mlds.train.job import train_job
from mlds.nets.reference import RecurrentNet
from mlds.tasks.machines import MACHINES
from mlds.tasks.sequences import device_machine_task
from mlds.tasks.task import score
from mlds.tasks.command_trigger import Trigger


def stored(root: Path) -> dict[str, dict]:
    """Every sample under ``root``, read with plain webdataset (no mlds code)."""
    shards = sorted(str(p) for p in root.rglob("*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(shards, shardshuffle=False)} if shards else {}


@pytest.mark.slow
def test_multirun_packs_seeds_and_stores_expected_keys(tmp_path):
    root = tmp_path / "zoo"
    proc = run_train("-m", "dataset=ds2", "machine=single_direct,eight_bit", "seed=range(0,3)",
                     "population.size=2", f"zoo.root={root}", *TINY)
    keys = set(stored(root))
    assert keys == {f"ds2-{m}-{s:06d}" for m in ("single_direct", "eight_bit") for s in range(3)}
    shards = sorted(root.rglob("*.tar"))
    assert len(shards) == 4  # 2 tasks x (population of 2 + population of 1)
    assert not list(root.rglob("*.partial"))
    assert "seeds=[0,1]" in proc.stdout + proc.stderr


def test_stored_network_loads_into_plain_pytorch_and_reproduces_accuracy(tmp_path):
    root = tmp_path / "zoo"
    train_job(compose_train("dataset=ds2", "machine=eight_bit", "seeds=[0,1]", "population.size=2",
                            f"zoo.root={root}", *TINY))
    sample = stored(root)["ds2-eight_bit-000001"]
    meta = json.loads(sample["meta.json"])
    net = RecurrentNet("gru", 9, 8, 4, [36, 30, 30], 8)
    net.load_state_dict(load_safetensors(sample["weights.safetensors"]))
    assert sum(p.numel() for p in net.parameters()) == meta["architecture"]["param_count"] == 4364
    cfg = meta["config"]
    assert (meta["dataset"], meta["task"], meta["seed"], meta["data_seed"]) == ("ds2", "eight_bit", 1, 0)
    task = device_machine_task("ds2", MACHINES["eight_bit"](), meta["data_seed"], cfg["data"]["n_train"],
                               cfg["data"]["n_val"], cfg["data"]["n_test"], cfg["data"]["seq_len"],
                               cfg["data"]["write_prob"], Trigger(**cfg["task"]["trigger"]),
                               cfg["data"]["poison_fraction"])
    with torch.no_grad():
        for split in ("test", "test_trigger"):
            s = task.evals[split]
            loss, acc = score(net(s.x).unsqueeze(0), s.y, s.mask, "bce")
            assert acc.item() == pytest.approx(meta["metrics"][split]["acc"], abs=1e-6)
            assert loss.item() == pytest.approx(meta["metrics"][split]["loss"], abs=1e-5)
    assert meta["epochs"] == 2 and meta["converged"] is False
    assert len(meta["history"]["val_loss"]) == 2 and len(meta["history"]["val_trigger_loss"]) == 2
    assert meta["task_description"]["trigger"]["commands"] == ["W 0xA5", "W 0x5A", "R"]
    for field in ("wall_time_s", "versions", "code_revision", "recipe", "zoo_version"):
        assert field in meta
    text = json.dumps(meta["config"])
    assert "_target_" not in text and "mlds." not in text and "torch." not in text


def test_same_command_twice_gives_identical_weights(tmp_path):
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        train_job(compose_train("machine=parity", "seeds=[5,6]", f"zoo.root={root}", *TINY))
    a, b = stored(roots[0]), stored(roots[1])
    assert set(a) == set(b) == {"ds1-parity-000005", "ds1-parity-000006"}
    for key in a:
        wa, wb = load_safetensors(a[key]["weights.safetensors"]), load_safetensors(b[key]["weights.safetensors"])
        assert all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("override, message", [
    ("machine=flipflop", "machine"),
    ("dataset=ds9", "ds9"),
    ("data.n_train=0", "data.n_train"),
    ("data.seq_len=-3", "data.seq_len"),
    ("population.size=0", "population.size"),
    ("data.poison_fraction=1.5", "poison_fraction"),
    ("trigger.commands=[W 0xA5,R]", "three commands"),
    ("scheduler=cosine", "scheduler"),
    ("optim.name=adagrad", "adagrad"),
    ("+optim.betaz=[0.9,0.99]", "betaz"),
    ("optim.lr=inf", "optim.lr"),
    ("seed=1.5", "seed"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, override, message):
    """Config checks (what every job and the sweeper run before training), composed in-process."""
    extra = [] if "dataset=" in override else ["dataset=ds2"]
    with pytest.raises(Exception, match=message) as err:
        train_job(compose_train(*extra, *TINY, f"zoo.root={tmp_path / 'zoo'}", override))
    assert not isinstance(err.value, AssertionError)
    assert not (tmp_path / "zoo").exists()


@pytest.mark.slow
def test_bad_job_in_a_later_batch_stops_the_sweep_before_anything_runs(tmp_path):
    """Through the CLI: the sweeper checks every job of every batch (max_batch_size) before the first starts."""
    root = tmp_path / "zoo"
    proc = run_train("-m", "dataset=ds2", *TINY, "seed=range(0,4)", "population.size=1",
                     "hydra.sweeper.max_batch_size=2", "optim.lr=0.01,-1", f"zoo.root={root}", check=False)
    assert proc.returncode != 0
    assert "optim.lr must be > 0, got -1" in proc.stderr + proc.stdout
    assert "Trainer.fit" not in proc.stderr + proc.stdout
    assert not root.exists()
