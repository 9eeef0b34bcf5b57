#!/usr/bin/env python
"""Training throughput: one network per process (A) against the population engine (B).

    python scripts/bench.py --dataset ds1            # default protocol (a few minutes)
    python scripts/bench.py --dataset ds3 --quick    # under two minutes
    python scripts/bench.py --plan ds1 1000          # what building MLDS-DS1-1000 costs: here, on SLURM, on a GPU

Both sides train networks of the dataset's default task (ds1: single_direct;
ds3: automaton 0; ds4: clean digits) under the default protocol (the project's Hydra defaults:
data, architecture, Adam, batch size; validation after every epoch) for a
fixed number of optimizer steps per network; nothing stops early.

(A) The baseline: one network per process, the idiomatic way — a
    LightningModule around the plain module (:mod:`mlds.nets.reference`:
    ``nn.GRU``/``nn.LSTM``/``nn.Conv2d``), a shuffling ``DataLoader`` and its own
    ``L.Trainer(max_steps=N)`` per network; as many worker processes as cores,
    one thread each.
(B) The population engine (:class:`mlds.train.engine.PopulationModule`, the code a
    training job runs) with an ``L.Trainer(max_steps=N)``: each candidate
    population size K is run as P processes x T threads (``--layouts``); the
    best (K, layout) is then measured with N steps per network.

Rates count optimizer steps only, summed over networks, over the training loop
(first batch to the end of training, validation included), averaged over the
processes running side by side; process start-up (interpreter, imports, data)
and per-network set-up (model, Trainer) are reported separately. Each line
also gives steps per CPU-second of the processes (a check that is less
sensitive to other load on a shared machine; the load average is printed).
Peak memory is each process's maximum resident set. The last line is
``speedup: <B/A>x`` (wall-clock rates). With a CUDA device present, B is also
measured there for the sizes ``--gpu-sizes`` (rate and peak GPU memory), and
compared with the CPU baseline.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
DEFAULTS = {  # default protocol: steps per network; population sizes to try on CPU and on CUDA
    "ds1": dict(steps=256, quick_steps=64, sizes=[16, 32, 64, 128, 256], quick_sizes=[32, 64],
                gpu_sizes=[1024, 4096, 16384], quick_gpu_sizes=[1024, 4096], baseline_networks=4,
                quick_baseline_networks=2),
    "ds2": dict(steps=256, quick_steps=64, sizes=[16, 32, 64, 128, 256], quick_sizes=[32, 64],
                gpu_sizes=[1024, 4096, 16384], quick_gpu_sizes=[1024, 4096], baseline_networks=4,
                quick_baseline_networks=2),
    "ds3": dict(steps=64, quick_steps=32, sizes=[2, 4, 8, 16], quick_sizes=[4, 8],
                gpu_sizes=[64, 256, 1024], quick_gpu_sizes=[64, 256], baseline_networks=4,
                quick_baseline_networks=2),
    "ds4": dict(steps=256, quick_steps=64, sizes=[16, 32, 64, 128], quick_sizes=[16, 64],
                gpu_sizes=[1024, 4096, 16384], quick_gpu_sizes=[1024, 4096], baseline_networks=4,
                quick_baseline_networks=2),
}
TASK_OVERRIDES = {"ds1": ["dataset=ds1", "machine=single_direct"], "ds2": ["dataset=ds2", "machine=single_direct"],
                  "ds3": ["dataset=ds3", "automaton=0"],
                  "ds4": ["dataset=ds4", "trojan=none"]}  # ds4: the clean task, the same work on both sides

_W: dict = {}  # per worker process: config, task, barrier

# Mean epochs a network of each task runs at the default settings, from the calibration tables of the
# README (converged networks at their median epoch, the others at max_epochs); --calibration ROOT
# measures them from a zoo instead. ds3: the mean over the 12 automata calibrated, for every automaton.
CALIBRATED_EPOCHS = {
    "ds1": {"single_direct": 17.5, "single_invert": 12.5, "simple_xor": 21.5, "eight_bit": 974.0, "parity": 1000.0},
    "ds2": {"single_direct": 58.0, "single_invert": 296.5, "simple_xor": 187.1, "eight_bit": 1000.0,
            "parity": 1000.0},
    "ds3": {"*": 13.5},
    "ds4": {"clean": 7.0, "patch": 9.0, "blend": 12.5},
}
PLAN_POPULATION = {"ds1": 64, "ds2": 64, "ds3": 4, "ds4": 128}  # population size per CPU process (README)


# ---- configuration: the project's own Hydra defaults -----------------------------------------
def compose(dataset: str) -> dict:
    """The recipe of ``dataset``'s default training config (as ``train.py`` would see it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mlds.train.recipe import recipe

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=TASK_OVERRIDES[dataset])
    return recipe(cfg)


def quiet() -> None:
    warnings.filterwarnings("ignore")
    import lightning  # noqa: F401  (it sets up its loggers on import)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
        for sub in list(logging.root.manager.loggerDict):
            if sub.startswith(name + "."):
                logging.getLogger(sub).setLevel(logging.ERROR)


def _init_worker(cfg: dict, threads: int, barrier, device: str) -> None:
    """Worker start-up (timed separately): threads, imports, the task's data."""
    began = time.perf_counter()
    import torch

    from mlds.datasets import build_task

    quiet()
    torch.set_num_threads(threads)
    _W.update(cfg=cfg, barrier=barrier, device=device, task=build_task(cfg))
    _W["startup_s"] = time.perf_counter() - began


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _timer():
    import lightning as L

    class LoopTimer(L.Callback):
        """Wall time of the training loop: first training batch to the end of training."""

        def __init__(self):
            self.t0 = self.t1 = self.c0 = self.c1 = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.t0 is None:
                self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_end(self, trainer, pl_module):
            self.stop()

        def stop(self):
            self.t1, self.c1 = time.perf_counter(), time.process_time()

    return LoopTimer()


def _trainer(steps: int, timer, accelerator: str = "cpu"):
    import lightning as L

    return L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, callbacks=[timer])


# ---- (A) one network per process: a plain LightningModule around the plain module --------------
def _plain_module_class():
    import lightning as L
    import torch
    from torch.nn import functional as F

    from mlds.nets.registry import build

    class PlainModule(L.LightningModule):
        """One plain network (``nn.GRU``/``nn.LSTM``/``nn.Conv2d`` + linear layers), Adam, BCE or CE."""

        def __init__(self, spec: dict, seed: int, loss: str, lr: float):
            super().__init__()
            torch.manual_seed(seed)
            self.net = build(spec)
            self.loss_kind, self.lr = loss, lr

        def loss(self, logits, y):
            if self.loss_kind == "bce":
                return F.binary_cross_entropy_with_logits(logits, y)
            return F.cross_entropy(logits.flatten(0, -2), y.flatten())

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", self.loss(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    return PlainModule


def baseline_job(seed: int, steps: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    began = time.perf_counter()
    cfg, task = _W["cfg"], _W["task"]
    module = _plain_module_class()(cfg["architecture"], seed, task.loss, cfg["optim"]["lr"])
    train = DataLoader(TensorDataset(task.train.x, task.train.y), batch_size=cfg["train"]["batch_size"],
                       shuffle=True, generator=torch.Generator().manual_seed(seed))
    val = DataLoader(TensorDataset(task.evals["val"].x, task.evals["val"].y), batch_size=256)
    timer = _timer()
    trainer = _trainer(steps, timer)
    trainer.fit(module, train, val)
    ended = time.perf_counter()
    loop = timer.t1 - timer.t0
    return dict(networks=1, steps=trainer.global_step, loop_s=loop, cpu_s=timer.c1 - timer.c0,
                setup_s=(ended - began) - loop, startup_s=_W["startup_s"], rss_mib=_rss_mib())


# ---- (B) the population engine --------------------------------------------------------------
def population_job(seeds: list[int], steps: int) -> dict:
    import torch

    from mlds.train.job import population_module

    began = time.perf_counter()
    cfg, task, device = _W["cfg"], _W["task"], _W["device"]
    # stop_loss 0: nothing converges, every network runs all its steps
    module = population_module({**cfg, "train": {**cfg["train"], "stop_loss": 0.0}}, task, seeds)
    timer = _timer()
    trainer = _trainer(steps, timer, "gpu" if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if _W["barrier"] is not None:
        _W["barrier"].wait()  # processes of one measurement train side by side
    trainer.fit(module)
    if device == "cuda":
        torch.cuda.synchronize()
        timer.stop()
    ended = time.perf_counter()
    loop = timer.t1 - timer.t0
    out = dict(networks=len(seeds), steps=trainer.global_step * len(seeds), loop_s=loop, cpu_s=timer.c1 - timer.c0,
               setup_s=(ended - began) - loop, startup_s=_W["startup_s"], rss_mib=_rss_mib())
    assert not any(r.converged for r in module.records)  # all trained every step
    if device == "cuda":
        out["gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ---- running and summarising -----------------------------------------------------------------
def summarise(results: list[dict], processes: int, steps_per_network: int) -> dict:
    """Loop rate of ``processes`` running side by side: all steps over the mean busy time per process."""
    steps = sum(r["steps"] for r in results)
    busy = sum(r["loop_s"] for r in results) / processes
    rate = steps / busy
    return dict(steps=steps, networks=sum(r["networks"] for r in results), rate=rate,
                cpu_rate=steps / sum(r["cpu_s"] for r in results),
                per_hour=3600.0 * rate / steps_per_network,
                setup_s=sum(r["setup_s"] for r in results) / len(results),
                startup_s=max(r["startup_s"] for r in results), rss_mib=max(r["rss_mib"] for r in results),
                gpu_mib=max((r.get("gpu_mib", 0.0) for r in results), default=0.0))


def pool(cfg: dict, processes: int, threads: int, device: str = "cpu", barrier: bool = False):
    ctx = mp.get_context("spawn")
    bar = ctx.Barrier(processes) if barrier else None
    return ProcessPoolExecutor(max_workers=processes, mp_context=ctx, initializer=_init_worker,
                               initargs=(cfg, threads, bar, device))


def run_baseline(cfg: dict, cores: int, networks: int, steps: int) -> dict:
    with pool(cfg, cores, 1) as ex:
        began = time.perf_counter()
        results = list(ex.map(partial(baseline_job, steps=steps), range(networks)))
        wall = time.perf_counter() - began
    s = summarise(results, min(cores, networks), steps)
    s["wall_per_hour"] = 3600.0 * networks / wall  # incl. worker start-up and per-network set-up
    return s


def run_population(ex, processes: int, size: int, steps: int) -> dict:
    jobs = [list(range(p * size, (p + 1) * size)) for p in range(processes)]
    results = list(ex.map(partial(population_job, steps=steps), jobs))
    return summarise(results, processes, steps)


def layouts(spec: str) -> list[tuple[int, int]]:
    """``"1x1,2x1"`` -> ``[(1, 1), (2, 1)]`` (processes, threads), without duplicates."""
    out = []
    for item in spec.split(","):
        p, t = item.lower().split("x")
        if (int(p), int(t)) not in out:
            out.append((int(p), int(t)))
    return out


def fmt(s: dict) -> str:
    gpu = f", GPU peak {s['gpu_mib']:.0f} MiB" if s.get("gpu_mib") else ""
    return (f"{s['rate']:8.1f} steps/s {s['per_hour']:9.0f} networks/h | {s['cpu_rate']:7.1f} steps/cpu-s"
            f" | peak RSS {s['rss_mib']:.0f} MiB{gpu} | set-up {s['setup_s']:.2f} s/job")


def say(line: str) -> None:
    print(line)


def calibrated_epochs(dataset: str, root: str | None) -> tuple[dict[str, float], str]:
    """Mean epochs per task: measured from the networks of a zoo (``root``), else the README's tables."""
    from mlds.datasets import DATASETS

    tasks = DATASETS[dataset].tasks
    if root:
        from collections import defaultdict

        from mlds.zoo.store import ZooStore, read_shard

        epochs = defaultdict(list)
        for shard in ZooStore(root).shards(dataset):
            for net in read_shard(shard, verify=False):
                epochs[net.meta["task"]].append(net.meta["epochs"])
        if not epochs:
            raise SystemExit(f"error: no {dataset} networks under {root}")
        mean = sum(sum(v) for v in epochs.values()) / sum(len(v) for v in epochs.values())
        return ({t: sum(epochs[t]) / len(epochs[t]) if epochs.get(t) else mean for t in tasks},
                f"measured from {sum(len(v) for v in epochs.values())} networks under {root}")
    table = CALIBRATED_EPOCHS[dataset]
    return {t: table.get(t, table.get("*")) for t in tasks}, "the README's calibration tables"


def flops_per_step(cfg: dict, task) -> float:
    """FLOPs of one optimizer step of one network (forward + backward of one batch), counted by
    ``torch.utils.flop_counter`` on the plain module, with oneDNN off: its fused CPU LSTM is one
    operator the counter does not see (DS3's count would hold the head alone, 8x too low)."""
    import torch
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from mlds.nets.registry import build

    net = build(cfg["architecture"])
    batch = cfg["train"]["batch_size"]
    x, y = task.train.x[:batch], task.train.y[:batch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oneDNN's notice when it is switched off
        with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
            logits = net(x)
            loss = (F.binary_cross_entropy_with_logits(logits, y) if task.loss == "bce"
                    else F.cross_entropy(logits.flatten(0, -2), y.flatten()))
            loss.backward()
    return float(counter.get_total_flops())


def plan(dataset: str, size: int, args) -> None:
    """Estimate what building MLDS-<dataset>-<size> costs here, on a SLURM array and on a GPU."""
    from mlds.datasets import build_task, dataset_info

    info = dataset_info(dataset, size)
    cfg = compose(dataset)
    task = build_task(cfg)
    epochs, origin = calibrated_epochs(dataset, args.calibration)
    steps_per_epoch = -(-len(task.train) // cfg["train"]["batch_size"])
    network_steps = size * sum(epochs.values()) * steps_per_epoch
    k = args.population or PLAN_POPULATION[dataset]
    cores = args.cores
    say(f"plan: {info.release(size)}: {size} networks x {len(info.tasks)} tasks = {size * len(info.tasks):,} networks; "
        f"mean epochs per network {sum(epochs.values()) / len(epochs):.1f} ({origin}), {steps_per_epoch} steps "
        f"per epoch: {network_steps:.3g} network-steps (validation included in the measured rate)")
    quiet()
    with pool(cfg, cores, 1, barrier=cores > 1) as ex:
        measured = run_population(ex, cores, k, args.plan_steps)
    per_process = measured["rate"] / cores
    say(f"measured here: {cores} processes x 1 thread, population size {k}: {measured['rate']:.0f} network-steps/s "
        f"({per_process:.0f} per process)")
    core_hours = network_steps / per_process / 3600
    say(f"this machine ({cores} cores): {core_hours:,.1f} core-hours, wall {format_hours(core_hours / cores)} "
        f"(estimate)")
    tasks = len(info.tasks) * -(-size // k)
    per_task_h = k * (sum(epochs.values()) / len(epochs)) * steps_per_epoch / per_process / 3600
    worst_h = k * max(epochs.values()) * steps_per_epoch / per_process / 3600
    say(f"SLURM (estimate, cores like these): {tasks:,} array tasks of {k} networks, 1 CPU each; "
        f"{per_task_h:.2f} h per task on average, up to {worst_h:.2f} h (set hydra.launcher.timeout_min >= "
        f"{int(60 * worst_h * 1.5) + 1}); wall with {args.slurm_parallel} tasks at a time: "
        f"{format_hours(max(worst_h, core_hours / min(args.slurm_parallel, tasks)))}")
    flops = flops_per_step(cfg, task) * network_steps
    say(f"GPU (a bound, not a measurement): {flops_per_step(cfg, task) / 1e6:.1f} MFLOP per network-step, "
        f"{flops / 1e15:.1f} PFLOP in all: {format_hours(flops / (args.gpu_tflops * 1e12) / 3600)} at a sustained "
        f"{args.gpu_tflops:g} TFLOP/s; measure with --gpu-sizes on the GPU")


def format_hours(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:,.1f} h" if hours < 48 else f"{hours / 24:,.1f} days"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=sorted(TASK_OVERRIDES), default="ds1")
    parser.add_argument("--quick", action="store_true", help="short run, under two minutes")
    parser.add_argument("--steps", type=int, help="optimizer steps per network")
    parser.add_argument("--search-steps", type=int, help="steps per network while searching population sizes")
    parser.add_argument("--sizes", help="population sizes to try, e.g. 64,128,256")
    parser.add_argument("--layouts", help="processes x threads to try for B, e.g. 1x1,2x1,1x2 (default: 1x1 and "
                        "one single-threaded process per core; several intra-op threads per process measured far "
                        "slower for these small operators)")
    parser.add_argument("--baseline-networks", type=int, help="networks trained by A")
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--gpu-sizes", help="population sizes to try on CUDA (when present)")
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--plan", nargs=2, metavar=("DATASET", "SIZE"),
                        help="estimate the cost of release MLDS-<DATASET>-<SIZE> instead (e.g. --plan ds1 1000)")
    parser.add_argument("--calibration", metavar="ROOT", help="--plan: mean epochs per task from this zoo")
    parser.add_argument("--population", type=int, help="--plan: population size per process")
    parser.add_argument("--plan-steps", type=int, default=64, help="--plan: steps per network to measure the rate")
    parser.add_argument("--slurm-parallel", type=int, default=256, help="--plan: array tasks at a time")
    parser.add_argument("--gpu-tflops", type=float, default=50.0,
                        help="--plan: assumed sustained GPU throughput for the bound (default 50)")
    args = parser.parse_args(argv)
    if args.plan:
        from mlds.datasets import UnknownDatasetError

        try:
            return plan(args.plan[0].lower(), int(args.plan[1]), args)
        except (UnknownDatasetError, ValueError) as err:
            raise SystemExit(f"error: {err}") from None

    d = DEFAULTS[args.dataset]
    steps = args.steps or (d["quick_steps"] if args.quick else d["steps"])
    search_steps = steps if args.quick else (args.search_steps or d["quick_steps"])
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (d["quick_sizes"] if args.quick else d["sizes"])
    n_base = args.baseline_networks or (d["quick_baseline_networks"] if args.quick else d["baseline_networks"])
    cores = args.cores
    lays = layouts(args.layouts or f"1x1,{cores}x1")

    quiet()
    import torch

    cfg = compose(args.dataset)
    arch = cfg["architecture"]
    say(f"MLDS bench: {args.dataset} ({', '.join(f'{k} {v}' for k, v in cfg['task'].items())}, "
          f"{arch['name']}), {steps} optimizer steps per network, batch {cfg['train']['batch_size']}, "
          f"Adam lr {cfg['optim']['lr']}, validation every epoch")
    say(f"machine: {platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")
    cuda = torch.cuda.is_available() and not args.no_gpu
    if cuda:
        say(f"CUDA device: {torch.cuda.get_device_name(0)}, "
              f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    t_all = time.perf_counter()

    # (A)
    a = run_baseline(cfg, cores, n_base, steps)
    say(f"A  one network per process ({min(cores, n_base)} processes x 1 thread, {n_base} networks): {fmt(a)}")
    say(f"   start-up per process {a['startup_s']:.1f} s; wall incl. start-up and set-up: "
          f"{a['wall_per_hour']:.0f} networks/h")

    # (B) search: population size x layout
    results = {}
    for p, t in lays:
        with pool(cfg, p, t, barrier=p > 1) as ex:
            for k in sizes:
                s = run_population(ex, p, k, search_steps)
                results[(p, t, k)] = s
                say(f"B  search {p}x{t} K={k:<5d} ({search_steps} steps): {fmt(s)}")
    best = max(results, key=lambda key: results[key]["rate"])
    p, t, k = best
    if search_steps != steps:
        with pool(cfg, p, t, barrier=p > 1) as ex:
            b = run_population(ex, p, k, steps)
    else:
        b = results[best]
    say(f"B  population engine, best: {p} process(es) x {t} thread(s), population size {k} "
          f"({p * k} networks): {fmt(b)}")
    say(f"   start-up per process {b['startup_s']:.1f} s")

    if cuda:
        gsizes = ([int(s) for s in args.gpu_sizes.split(",")] if args.gpu_sizes
                  else d["quick_gpu_sizes" if args.quick else "gpu_sizes"])
        gpu = {}
        with pool(cfg, 1, 1, device="cuda") as ex:
            for gk in gsizes:
                try:
                    gpu[gk] = run_population(ex, 1, gk, steps)
                    say(f"G  population engine on CUDA, K={gk:<6d}: {fmt(gpu[gk])}")
                except Exception as err:  # e.g. out of memory: report and go on
                    say(f"G  population engine on CUDA, K={gk:<6d}: failed ({type(err).__name__}: {err})")
        if gpu:
            gk = max(gpu, key=lambda key: gpu[key]["rate"])
            say(f"G  best on CUDA: K={gk}: {gpu[gk]['rate']:.1f} steps/s = "
                  f"{gpu[gk]['rate'] / a['rate']:.1f}x the CPU baseline A")

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    say(f"peak RSS: largest child process {children:.0f} MiB, this process {_rss_mib():.0f} MiB; "
          f"bench wall {time.perf_counter() - t_all:.0f} s, load average {os.getloadavg()[0]:.2f}")
    say(f"A {a['rate']:.1f} steps/s, {a['per_hour']:.0f} networks/h | B {b['rate']:.1f} steps/s, "
          f"{b['per_hour']:.0f} networks/h")
    say(f"speedup per CPU-second (less sensitive to other load on the machine): "
        f"{b['cpu_rate'] / a['cpu_rate']:.1f}x")
    say(f"speedup: {b['rate'] / a['rate']:.1f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
