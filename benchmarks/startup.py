"""Start-up: `kbtune --help`, and the time from launching `python scripts/train.py` to its first
optimizer step, against the bare import time of the libraries training needs, each in a fresh
interpreter, interleaved.

The first step is read from the run's own record, without instrumenting kbtune: with
`trainer.log_every_n_steps=1` Lightning logs `train/loss` to MLflow right after step 1, and MLflow
stamps the metric with the wall clock. Measured warm (the data cache and the MLflow store exist:
a first, unmeasured run creates them); the cold run is reported beside it.

Standalone: `python benchmarks/startup.py [--quick]`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import harness
import kbs

LIBRARIES = ("torch", "pytorch_lightning", "transformers", "mlflow", "chromadb", "hydra")


def help_time() -> dict[str, float]:
    seconds, proc = harness.run_timed(
        [str(Path(harness.PYTHON).parent / "kbtune"), "--help"], env=harness.bench_env()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kbtune --help failed: {proc.stderr[-2000:]}")
    return {"seconds": seconds}


def import_time() -> dict[str, float]:
    seconds, proc = harness.run_timed(
        [harness.PYTHON, "-c", f"import {', '.join(LIBRARIES)}"], env=harness.bench_env()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"importing {LIBRARIES} failed: {proc.stderr[-2000:]}")
    return {"seconds": seconds}


def first_step_time(root: Path, overrides: list[str]) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    cmd = [harness.PYTHON, str(harness.REPO / "scripts" / "train.py"), f"paths.root={root}", *overrides,
           "trainer.max_steps=1", "trainer.log_every_n_steps=1", "register=false"]  # fmt: skip
    launched = time.time()
    seconds, proc = harness.run_timed(cmd, env=harness.bench_env())
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/train.py failed:\n{proc.stderr[-3000:]}")
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("kbtune")
    run = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )[0]
    (first, *_) = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    return {"seconds": first.timestamp / 1000 - launched, "process_seconds": seconds}


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    rounds = rounds or (1 if quick else 3)
    kb = kbs.sample_kb(workdir)
    root = workdir / "startup"
    overrides = [f"kb.path={kb['path']}", f"kb.collection={kb['collection']}"]
    overrides += ["model=tiny", "data.block_size=64"] if quick else []
    cold = None
    if not quick:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        cold = first_step_time(root, overrides)
        harness.log(
            f"  [startup] cold first step (creates the store and the data cache): {cold['seconds']:.2f}s"
        )
    samples = harness.interleave(
        {"kbtune_help": help_time, "bare_imports": import_time, "first_step": lambda: first_step_time(root, overrides)},
        rounds, "startup",
    )  # fmt: skip
    s = harness.summarise(samples)
    imports, first = s["bare_imports"]["seconds"]["median"], s["first_step"]["seconds"]["median"]
    rows = [
        harness.row("startup", "kbtune --help", "kbtune_help", "wall", "s", s["kbtune_help"]["seconds"]),
        harness.row("startup", "to first step", "bare_imports", "wall", "s", s["bare_imports"]["seconds"]),
        harness.row(
            "startup",
            "to first step",
            "first_step",
            "wall",
            "s",
            s["first_step"]["seconds"],
            s["bare_imports"]["seconds"],
            "bare_imports",
        ),  # fmt: skip
    ]
    targets = [
        harness.target("kbtune --help (s)", s["kbtune_help"]["seconds"]["median"], "<=", 0.5),
        harness.target("first optimizer step - bare imports (s)", first - imports, "<=", 3.0, "bare imports"),
    ]
    details = {"libraries": list(LIBRARIES), "overrides": overrides, "cold_first_step": cold,
               "measured": "warm" if not quick else "cold (quick mode)"}  # fmt: skip
    return {"rows": rows, "targets": targets, "summaries": s, "samples": samples, "details": details}


def main() -> None:
    harness.section_main(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
