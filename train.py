"""Train networks into the zoo store.  ``python train.py -m dataset=ds2 'seed=range(0,500)'``

Exit status: 0; 2 with one ``error:`` line for bad input (a config that cannot
train, an override or sweep Hydra refuses), before any work; 143 (SIGTERM) or
130 (Ctrl-C) with one line saying what was not stored and that the same command
resumes; anything else is a bug and shows its traceback.
"""
import os
import sys

import hydra
import lightning  # noqa: F401  imported before Hydra configures logging, so conf/train.yaml sets its level
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from mlds.train.job import train_job

    train_job(cfg, log_dir=HydraConfig.get().runtime.output_dir)


def run() -> int:
    """``main()`` with bad input and signals reported in one line each (see the module docstring)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mlds.train.checks import ConfigError
    from mlds.train.interrupts import JobInterrupted, JobInterruptedError, interruptible

    full = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the user asked for tracebacks
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing a trimmed traceback itself
    try:
        with interruptible():
            main()
    except (JobInterrupted, JobInterruptedError) as err:  # the second: from a SLURM job
        print(f"error: {err}", file=sys.stderr)
        return err.code
    except (ConfigError, HydraException, OmegaConfBaseException) as err:
        if full:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
