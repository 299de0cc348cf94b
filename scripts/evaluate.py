"""Evaluate a model version on its session's held-out documents: `python scripts/evaluate.py version=v1`.
The result is the only thing written to stdout (JSON), so `> result.json` works; logs go to stderr."""

import json
import logging
import sys
from pathlib import Path

import hydra

from kbtune.configuration import user_errors
from kbtune.jobs import evaluate
from kbtune.project import configure_environment

ROOT = Path(__file__).resolve().parents[1]
configure_environment(ROOT)
log = logging.getLogger("kbtune")


@hydra.main(config_path=str(ROOT / "conf"), config_name="evaluate", version_base="1.3")
def main(cfg) -> None:
    try:
        results = evaluate(cfg)
    except user_errors() as exc:
        log.error("%s", exc)
        sys.exit(2)
    print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
