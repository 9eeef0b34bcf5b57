"""scripts/calibrate.py: replaying a looser stop rule on recorded histories."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "calibrate.py"
spec = importlib.util.spec_from_file_location("calibrate", SCRIPT)
calibrate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(calibrate)


def meta(history: dict, stop_loss=0.005, max_epochs=4) -> dict:
    return {"task": "automaton_000", "seed": 3, "epochs": len(history["train_loss"]), "converged": False,
            "stop_loss": stop_loss, "config": {"train": {"stop_loss": stop_loss, "max_epochs": max_epochs}},
            "metrics": {"test": {"acc": 0.5}}, "history": history}


HISTORY = {"train_loss": [0.9, 0.1, 0.05, 0.01], "val_loss": [0.5, 0.03, 0.01, 0.02],
           "val_acc": [0.6, 0.97, 0.99, 0.98]}


def test_replay_stops_at_the_first_epoch_below_the_looser_threshold():
    replayed = calibrate.replay(meta(HISTORY), 0.04, None)
    assert replayed["converged"] and replayed["epochs"] == 2 and replayed["metrics"]["val"]["acc"] == 0.97
    assert calibrate.replay(meta(HISTORY), 0.015, None)["epochs"] == 3
    never = calibrate.replay(meta(HISTORY), 0.005, None)
    assert not never["converged"] and never["epochs"] == 4 and never["metrics"]["val"]["acc"] == 0.98
    cut = calibrate.replay(meta(HISTORY), 0.015, 2)
    assert not cut["converged"] and cut["epochs"] == 2 and cut["config"]["train"]["max_epochs"] == 2


def test_replay_needs_every_stop_split_below_the_threshold():
    history = {**HISTORY, "val_trigger_loss": [0.5, 0.2, 0.03, 0.01], "val_trigger_acc": [0.5, 0.8, 0.96, 0.99]}
    replayed = calibrate.replay(meta(history), 0.04, None)
    assert replayed["epochs"] == 3 and replayed["metrics"]["val_trigger"]["acc"] == 0.96


@pytest.mark.parametrize("stop_loss, max_epochs, message", [(0.001, None, "stricter"), (None, 5, "at most 4")])
def test_replay_refuses_what_the_histories_cannot_answer(stop_loss, max_epochs, message):
    with pytest.raises(calibrate.ReplayError, match=message):
        calibrate.replay(meta(HISTORY), stop_loss, max_epochs)
