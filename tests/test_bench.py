"""The planner's FLOP count (scripts/bench.py): every layer counted, the fused CPU LSTM included."""
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from conftest import GRU_SPEC, LSTM_SPEC, REPO


def bench():
    spec = importlib.util.spec_from_file_location("mlds_script_bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def multiply_adds_per_position(spec: dict) -> int:
    """Weights applied once per sequence position: the recurrent layers' and the head's."""
    gates = {"gru": 3, "lstm": 4}[spec["cell"]] * spec["hidden_size"]
    recurrent = sum(gates * (width + spec["hidden_size"])
                    for width in [spec["input_size"]] + [spec["hidden_size"]] * (spec["num_layers"] - 1))
    sizes = [spec["hidden_size"], *spec["head_sizes"], spec["output_size"]]
    return recurrent + sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


@pytest.mark.parametrize("spec,loss", [(GRU_SPEC, "bce"), (LSTM_SPEC, "ce")])
def test_flops_per_step_counts_every_layer(spec, loss):
    batch, t_len = 4, 5
    x = torch.rand(batch, t_len, spec["input_size"])
    y = ((torch.rand(batch, t_len, spec["output_size"]) < 0.5).float() if loss == "bce"
         else torch.randint(spec["output_size"], (batch, t_len)))
    task = SimpleNamespace(train=SimpleNamespace(x=x, y=y), loss=loss)
    counted = bench().flops_per_step({"architecture": spec, "train": {"batch_size": batch}}, task)
    # forward 2 FLOP per multiply-add, backward twice that; the first layer's input gradient is not needed
    expected = 6 * multiply_adds_per_position(spec) * batch * t_len
    assert counted == pytest.approx(expected, rel=0.05)
