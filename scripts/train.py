"""Train a causal LM on the knowledge base: `python scripts/train.py model=small trainer.max_epochs=3`.

Hydra composes conf/train.yaml with the command-line overrides; kbtune.pipeline does the rest."""

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KBTUNE_ROOT", str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import hydra  # noqa: E402

from kbtune import pipeline  # noqa: E402

log = logging.getLogger("kbtune")


@hydra.main(config_path=str(ROOT / "conf"), config_name="train", version_base="1.3")
def main(cfg) -> float | None:
    try:
        return pipeline.train(cfg)
    except pipeline.user_errors() as exc:
        log.error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
