"""Evaluate a model version on its session's held-out documents: `python scripts/evaluate.py version=v1`."""

import json
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


@hydra.main(config_path=str(ROOT / "conf"), config_name="evaluate", version_base="1.3")
def main(cfg) -> None:
    try:
        results = pipeline.evaluate(cfg)
    except pipeline.user_errors() as exc:
        log.error("%s", exc)
        sys.exit(2)
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
