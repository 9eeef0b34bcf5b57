"""Train networks into the zoo store.  ``python train.py -m dataset=ds2 'seed=range(0,500)'``"""
import hydra
import lightning  # noqa: F401  imported before Hydra configures logging, so conf/train.yaml sets its level
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from mlds.train.job import train_job

    train_job(cfg, log_dir=HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
