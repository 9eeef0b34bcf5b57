"""DS3: LSTM zoo of 100 random automata (config, network, stored sample, packing invariance)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from safetensors.torch import load as load_safetensors
from torch.nn import functional as F

from hydra_plugins.mlds_population_sweeper.population_sweeper import pack
from mlds.datasets import build_task
from mlds.nets.registry import population_from_seeds
from mlds.train.recipe import recipe
from mlds.nets.reference import RecurrentNet
from mlds.nets.registry import build, init_state_dict, param_count
from mlds.tasks.automata import Automaton, generate_automaton
from mlds.train.engine import PopulationModule
from mlds.tasks.sequences import automaton_name, automaton_task

REPO = Path(__file__).resolve().parent.parent
DS3_PARAMS = 136_846


def ds3_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["dataset=ds3", *overrides])


def spec_of(cfg) -> dict:
    return OmegaConf.to_container(cfg.architecture, resolve=True)


# ---- config and task -----------------------------------------------------------------------

def test_config_defaults():
    cfg = ds3_config()
    assert cfg.dataset.name == "ds3" and cfg.automaton == 0
    assert (cfg.data.n_states, cfg.data.n_inputs, cfg.data.n_outputs) == (16, 9, 4)
    assert (cfg.data.n_train, cfg.data.n_val, cfg.data.n_test, cfg.data.seq_len) == (32768, 256, 256, 32)
    assert cfg.train.batch_size == 32 and cfg.train.max_epochs == 30
    assert cfg.optim.name == "adam"
    # calibrated DS3 defaults (README, DS3 calibration) win over conf/train, conf/optim and conf/scheduler
    assert cfg.optim.lr == pytest.approx(0.01) and cfg.train.stop_loss == pytest.approx(0.005)
    assert cfg.scheduler.name == "exponential" and cfg.scheduler.gamma == 0.85
    assert cfg.optim.lr * cfg.scheduler.gamma ** cfg.train.max_epochs < 1e-4  # training has settled by the limit
    # a wrong step costs >= ln 2, so converged (mean val CE < stop_loss) means val accuracy >= 99%
    assert 1 - cfg.train.stop_loss / np.log(2) >= 0.99
    # and the command line still wins over the dataset's defaults
    cfg = ds3_config("optim.lr=0.003", "train.stop_loss=0.05", "train.max_epochs=7", "~scheduler")
    assert (cfg.optim.lr, cfg.train.stop_loss, cfg.train.max_epochs) == (0.003, 0.05, 7)
    assert "scheduler" not in cfg


def test_task_from_config():
    cfg = ds3_config("automaton=17", "data.n_train=40", "data.n_val=20", "data.n_test=30", "data.seq_len=12")
    task = build_task(recipe(cfg))
    machine = generate_automaton(17)
    assert task.dataset == "ds3" and task.name == automaton_name(17) == "automaton_017"
    assert task.loss == "ce" and task.stop_on == ("val",)
    assert task.description == {"automaton": machine.to_dict()}
    assert Automaton.from_dict(json.loads(json.dumps(task.description["automaton"]))) == machine
    for split, n in ((task.train, 40), (task.evals["val"], 20), (task.evals["test"], 30)):
        assert split.x.shape == (n, 12, 9) and split.x.dtype == torch.float32
        assert split.y.shape == (n, 12) and split.y.dtype == torch.int64 and split.mask is None
        assert torch.all(split.x.sum(-1) == 1)  # one-hot
        _, outputs = machine.run(split.x.argmax(-1).numpy())
        np.testing.assert_array_equal(split.y.numpy(), outputs)  # target: output of the state reached
    assert not torch.equal(task.train.x[:20], task.evals["val"].x)
    assert not torch.equal(task.evals["val"].x[:20], task.evals["test"].x[:20])


def test_task_identity():
    """All networks of a task share its data; data_seed and automaton change it."""
    args = dict(dataset="ds3", n_states=16, n_inputs=9, n_outputs=4, n_train=16, n_val=8, n_test=8, seq_len=10)
    a = automaton_task(automaton=3, data_seed=0, **args)
    b = automaton_task(automaton=3, data_seed=0, **args)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    c = automaton_task(automaton=3, data_seed=1, **args)
    assert not torch.equal(a.train.x, c.train.x)
    d = automaton_task(automaton=4, data_seed=0, **args)
    assert torch.equal(a.train.x, d.train.x) and not torch.equal(a.train.y, d.train.y)


def test_n_states_override():
    cfg = ds3_config("automaton=5", "data.n_states=8", "data.n_train=4", "data.n_val=4", "data.n_test=4")
    task = build_task(recipe(cfg))
    assert task.description["automaton"] == generate_automaton(5, n_states=8).to_dict()
    assert task.description["automaton"]["n_states"] == 8


def test_sweep_packs_seeds_per_automaton():
    """The DS3-100 sweep: 100 automata x 100 seeds -> per automaton, populations of population.size seeds."""
    overrides = OverridesParser.create().parse_overrides(["automaton=range(0,100)", "seed=range(0,100)"])
    jobs = pack(overrides, 64).jobs
    assert len(jobs) == 200
    per_automaton: dict[str, list[int]] = {}
    for job in jobs:
        (automaton,) = [o for o in job if o.startswith("automaton=")]
        (seeds,) = [o for o in job if o.startswith("seeds=")]
        packed = json.loads(seeds.split("=", 1)[1])
        assert len(packed) in (64, 36)
        per_automaton.setdefault(automaton, []).extend(packed)
    assert sorted(per_automaton) == sorted(f"automaton={i}" for i in range(100))
    assert all(sorted(s) == list(range(100)) for s in per_automaton.values())


# ---- network -------------------------------------------------------------------------------

def test_parameter_count_and_names():
    spec = spec_of(ds3_config())
    net = build(spec)
    assert param_count(net) == DS3_PARAMS
    assert isinstance(net.rnn, torch.nn.LSTM)
    assert (net.rnn.input_size, net.rnn.hidden_size, net.rnn.num_layers) == (9, 64, 4)
    assert [(m.in_features, m.out_features) for m in net.head if isinstance(m, torch.nn.Linear)] == [(64, 258), (258, 4)]
    names = [f"rnn.{k}_l{i}" for i in range(4) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert list(net.state_dict()) == names + ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]
    pop = population_from_seeds(spec, [0, 1])
    assert pop.names == list(net.state_dict())
    assert sum(p.numel() for p in pop.parameters()) == 2 * DS3_PARAMS


def test_population_forward_matches_nn_lstm():
    spec = spec_of(ds3_config())
    pop = population_from_seeds(spec, [4, 9])
    x = F.one_hot(torch.randint(0, 9, (5, 11), generator=torch.Generator().manual_seed(0)), 9).float()
    with torch.no_grad():
        logits = pop(x.unsqueeze(0))
        for k, seed in enumerate((4, 9)):
            plain = build(spec)
            plain.load_state_dict(pop.network_state_dict(k))
            torch.testing.assert_close(logits[k], plain(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pop.network_state_dict(k), init_state_dict(spec, seed), atol=0, rtol=0)


# ---- packing invariance ----------------------------------------------------------------------

class RecordingModule(PopulationModule):
    """PopulationModule that records the training sequences each network sees per optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict[int, torch.Tensor]] = []

    def training_step(self, step: int, batch_idx: int) -> None:
        idx = self._order[:, step * self.batch_size : (step + 1) * self.batch_size]
        self.seen.append({self.seeds[i]: idx[j].clone() for j, i in enumerate(self.active)})
        return super().training_step(step, batch_idx)


def _train_steps(spec, task, seeds, steps, lr):
    torch.manual_seed(1234)  # must not matter: every random draw comes from the network seeds
    net = population_from_seeds(spec, seeds)
    start = [net.network_state_dict(k) for k in range(len(seeds))]
    module = RecordingModule(net, task, seeds, partial(torch.optim.Adam, lr=lr), batch_size=32, stop_loss=1e-12)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module)
    assert trainer.global_step == steps and len(module.seen) == steps
    return start, module


def test_packing_invariance():
    """Seed 5 alone and inside a population of 3: same start, same batches, same weights after 20 steps."""
    cfg = ds3_config()
    spec = spec_of(cfg)
    # 80 sequences: batches of 32, 32, 16, so the 20 steps cross epochs and a partial batch
    task = automaton_task("ds3", 2, 16, 9, 4, 0, n_train=80, n_val=16, n_test=16, seq_len=16)
    alone_start, alone = _train_steps(spec, task, [5], 20, cfg.optim.lr)
    pop_start, pop = _train_steps(spec, task, [3, 5, 8], 20, cfg.optim.lr)
    for name, value in alone_start[0].items():
        assert torch.equal(value, pop_start[1][name]), name
    assert not torch.equal(pop_start[0]["rnn.weight_hh_l0"], pop_start[1]["rnn.weight_hh_l0"])
    for step, (a, p) in enumerate(zip(alone.seen, pop.seen)):
        assert torch.equal(a[5], p[5]), f"step {step}: different batch"
    assert not torch.equal(pop.seen[0][5], pop.seen[0][3])  # batch order does depend on the seed
    assert [len(s[5]) for s in alone.seen[:3]] == [32, 32, 16]
    trained_alone, trained_pop = alone.records[0], pop.records[1]
    assert trained_alone.seed == trained_pop.seed == 5
    assert trained_alone.epochs == trained_pop.epochs and trained_alone.history.keys() == trained_pop.history.keys()
    for name, values in trained_alone.history.items():
        assert values == pytest.approx(trained_pop.history[name], abs=1e-5), name
    moved = max(float((trained_alone.state_dict[n] - alone_start[0][n]).abs().max()) for n in alone_start[0])
    assert moved > 1e-3  # the networks did train
    for name, value in trained_alone.state_dict.items():
        torch.testing.assert_close(trained_pop.state_dict[name], value, atol=1e-5, rtol=0, msg=name)


# ---- end to end through the CLI ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """Two automata x two seeds through the real CLI sweep, tiny data, 2 epochs."""
    root = tmp_path_factory.mktemp("zoo")
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "dataset=ds3", "automaton=3,17", "seed=0,1",
           "data.n_train=64", "data.n_val=32", "data.n_test=32", "train.max_epochs=2", "train.progress=false",
           "train.accelerator=cpu", "train.threads=1", f"zoo.root={root}", f"hydra.sweep.dir={root / 'sweep'}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


def _plain_samples(shard: Path) -> list[dict]:
    """Samples read with webdataset and safetensors only (no mlds code)."""
    return [{"key": s["__key__"], "weights": load_safetensors(s["weights.safetensors"]),
             "meta": json.loads(s["meta.json"])}
            for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)]


@pytest.mark.slow
def test_stored_network_reproduces_its_metrics(tiny_zoo):
    shards = sorted((tiny_zoo / "ds3").rglob("*.tar"))
    assert [s.parent.name for s in shards] == ["automaton_003", "automaton_017"]  # one population per automaton
    for shard in shards:
        samples = _plain_samples(shard)
        assert len(samples) == 2
        for sample in samples:
            meta, key = sample["meta"], sample["key"]
            automaton = meta["config"]["task"]["automaton"]
            assert key == f"ds3-automaton_{automaton:03d}-{meta['seed']:06d}" and "." not in key
            assert meta["task"] == shard.parent.name and meta["population_size"] == 2 and meta["epochs"] == 2
            assert meta["architecture"]["param_count"] == DS3_PARAMS
            # the meta holds the automaton, and it is generate_automaton(id)
            stored = meta["task_description"]["automaton"]
            assert stored["automaton_id"] == automaton
            assert Automaton.from_dict(stored) == generate_automaton(automaton)
            assert stored == generate_automaton(automaton).to_dict()
            # the weights load into plain nn.LSTM / nn.Linear ...
            arch = meta["architecture"]
            net = RecurrentNet(arch["cell"], arch["input_size"], arch["hidden_size"], arch["num_layers"],
                               arch["head_sizes"], arch["output_size"])
            assert isinstance(net.rnn, torch.nn.LSTM)
            net.load_state_dict(sample["weights"], strict=True)
            assert param_count(net) == DS3_PARAMS
            # ... and reproduce the recorded test metrics on the test split regenerated from the config
            task = build_task(meta["config"])
            test = task.evals["test"]
            assert test.x.shape == (32, 32, 9)
            with torch.no_grad():
                logits = net(test.x)
            acc = float((logits.argmax(-1) == test.y).float().mean())
            loss = float(F.cross_entropy(logits.flatten(0, 1), test.y.flatten()))
            assert acc == pytest.approx(meta["metrics"]["test"]["acc"], abs=1e-6)
            assert loss == pytest.approx(meta["metrics"]["test"]["loss"], abs=1e-5)
            assert 0.0 <= acc <= 1.0 and len(meta["history"]["val_loss"]) == 2


@pytest.mark.slow
def test_tiny_zoo_rerun_is_idempotent(tiny_zoo):
    """Running the same sweep again trains nothing new (every network is already stored)."""
    before = sorted((tiny_zoo / "ds3").rglob("*.tar"))
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "dataset=ds3", "automaton=3", "seed=0,1",
           "data.n_train=64", "data.n_val=32", "data.n_test=32", "train.max_epochs=2", "train.progress=false",
           "train.accelerator=cpu", "train.threads=1", f"zoo.root={tiny_zoo}",
           f"hydra.sweep.dir={tiny_zoo / 'sweep2'}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted((tiny_zoo / "ds3").rglob("*.tar")) == before


@pytest.mark.slow
def test_calibrate_table(tiny_zoo):
    """scripts/calibrate.py summarises the stored networks, one row per automaton."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "calibrate.py"), "--root", str(tiny_zoo),
                             "--dataset", "ds3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| automaton_")]
    assert [r.split("|")[1].strip() for r in rows] == ["automaton_003", "automaton_017"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2" and cells[2] == "0% (0)" and cells[3] == "–" and cells[4] == "2"
    assert "total: 4 networks" in result.stdout and "max_epochs=2" in result.stdout
    empty = subprocess.run([sys.executable, str(REPO / "scripts" / "calibrate.py"), "--root", str(tiny_zoo),
                            "--dataset", "ds1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert empty.returncode == 1 and "no stored networks" in empty.stdout
    other = subprocess.run([sys.executable, str(REPO / "scripts" / "calibrate.py"), "--root", str(tiny_zoo),
                            "--dataset", "ds3", "--recipe", "0000000000"], cwd=REPO, capture_output=True, text=True)
    assert other.returncode == 1 and "with recipe 0000000000" in other.stdout
    looser = subprocess.run([sys.executable, str(REPO / "scripts" / "calibrate.py"), "--root", str(tiny_zoo),
                             "--dataset", "ds3", "--stop-loss", "100"], cwd=REPO, capture_output=True, text=True)
    assert looser.returncode == 0 and "| automaton_003 | 2 | 100% (2) | 1 |" in looser.stdout
