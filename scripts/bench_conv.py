#!/usr/bin/env python
"""How to run K small CNNs at once: the population's grouped convolution against torch.func.vmap.

    python scripts/bench_conv.py                      # 8x8 and 28x28, K = 16, 64, 256
    python scripts/bench_conv.py --sizes 64 --side 8

One step = forward + backward of K DS4 networks (4,970 parameters), each on its own
64 images (what training does), on one CPU thread. Compared side by side in one
process: (A) a loop over K plain ``nn.Conv2d`` networks (the baseline), (B) the
population model (:class:`mlds.nets.population.PopulationConvNet`: grouped
convolution, channels-last), (C) the same grouped convolution in the default
(contiguous) layout, (D) ``torch.func.vmap`` over ``functional_call`` of the plain
module. Prints ms per step (median of ``--repeats``) and the speedup against (A).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from mlds.nets.registry import build, population_from_seeds

SPEC = yaml.safe_load((Path(__file__).resolve().parent.parent / "conf" / "architecture" / "cnn_ds4.yaml").read_text())


def timed(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def measure(k: int, side: int, batch: int, repeats: int) -> dict[str, float]:
    x = torch.rand(k, batch, 1, side, side)
    y = torch.randint(0, 10, (k, batch))
    seeds = list(range(k))
    pop = population_from_seeds(SPEC, seeds)
    plain = [build(SPEC) for _ in seeds]
    for net, s in zip(plain, seeds):
        net.load_state_dict(pop.network_state_dict(s))

    def loop():
        for i, net in enumerate(plain):
            net.zero_grad()
            F.cross_entropy(net(x[i]), y[i]).backward()

    def grouped():
        pop.zero_grad()
        F.cross_entropy(pop(x).flatten(0, 1), y.flatten(), reduction="sum").div(batch).backward()

    def grouped_contiguous():
        pop.memory_format = torch.contiguous_format  # the same code, default layout
        try:
            grouped()
        finally:
            del pop.memory_format

    params = {n: torch.stack([dict(net.named_parameters())[n].detach() for net in plain]) for n, _ in
              plain[0].named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(plain[0], p, (xi,)), yi)

    vmapped = vmap(grad(loss))

    def vmap_step():
        vmapped(params, x, y)

    return {"loop of nn.Conv2d (A)": timed(loop, repeats), "grouped, channels-last (B)": timed(grouped, repeats),
            "grouped, contiguous (C)": timed(grouped_contiguous, repeats), "vmap (D)": timed(vmap_step, repeats)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,64,256", help="population sizes K")
    parser.add_argument("--side", type=int, action="append", help="image side (8: digits, 28: MNIST); repeatable")
    parser.add_argument("--batch", type=int, default=64, help="images per network per step")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for side in args.side or [8, 28]:
        for k in (int(s) for s in args.sizes.split(",")):
            result = measure(k, side, args.batch, args.repeats)
            base = result["loop of nn.Conv2d (A)"]
            print(f"{side}x{side} K={k:<4} " + " | ".join(f"{name} {ms:7.1f} ms ({base / ms:4.1f}x)"
                                                       for name, ms in result.items()), flush=True)


if __name__ == "__main__":
    main()
