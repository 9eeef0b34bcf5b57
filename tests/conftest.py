import os
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
TINY = ["data.n_train=64", "data.n_val=32", "data.n_test=32", "train.max_epochs=2", "train.progress=false"]
GRU_SPEC = dict(kind="recurrent", name="gru4x8-mlp36-30-30", cell="gru", input_size=9, hidden_size=8, num_layers=4, head_sizes=[36, 30, 30], output_size=8)
LSTM_SPEC = dict(kind="recurrent", name="lstm4x64-mlp258", cell="lstm", input_size=9, hidden_size=64, num_layers=4, head_sizes=[258], output_size=4)


def compose_train(*overrides, hydra: bool = False):
    """The composed ``train.py`` config for ``overrides``, in-process (``hydra``: with the hydra node)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def run_train(*overrides, check=True, timeout=300):
    """Run the real ``train.py`` CLI from the repository root."""
    env = dict(os.environ, HYDRA_FULL_ERROR="0", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def pytest_configure(config):
    """One torch thread, as every training job uses (``train.threads=1``): small operators are fastest
    so, and timings do not collapse when the other cores are busy."""
    import torch

    torch.set_num_threads(1)
