"""Train a causal LM on the knowledge base: `python scripts/train.py model=small trainer.max_epochs=3`.

Hydra composes conf/train.yaml with the command-line overrides; kbtune.jobs.train does the rest. The
session shows live progress in `kbtune status` and the page, and stops with `kbtune stop` or SIGTERM."""

import logging
import sys
from pathlib import Path

import hydra

from kbtune.configuration import user_errors
from kbtune.jobs import train
from kbtune.project import configure_environment

ROOT = Path(__file__).resolve().parents[1]
configure_environment(ROOT)
log = logging.getLogger("kbtune")


@hydra.main(config_path=str(ROOT / "conf"), config_name="train", version_base="1.3")
def main(cfg) -> float | None:
    try:
        return train(cfg)
    except user_errors() as exc:
        log.error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
