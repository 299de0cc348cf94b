"""End to end: `python scripts/train.py model=small trainer.max_epochs=3` on the sample KB, as a user
runs it (tokenizer training, data preparation, MLflow session, training, validation, checkpoints,
model registration), in a fresh project root each time: wall time and final val/loss. The sample KB
is ingested beforehand with cheap vectors (training never reads embeddings), so the one-off embedding
of the corpus is not counted.

The full run also trains at `trainer.precision=32-true` beside the default (auto: bf16-mixed where
the CPU supports it) to show what the precision costs in val/loss.

Standalone: `python benchmarks/e2e.py [--quick]`."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import harness
import kbs


def train_once(workdir: Path, name: str, overrides: list[str]) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    root = workdir / "e2e" / name
    shutil.rmtree(root, ignore_errors=True)
    seconds = harness.train_script(root, overrides, timeout=1800)
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    experiment = client.get_experiment_by_name("kbtune")
    (run,) = client.search_runs([experiment.experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)
    steps = max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    return {"seconds": seconds, "val_loss": history[-1].value, "first_val_loss": history[0].value,
            "validations": len(history), "last_logged_step": steps}  # fmt: skip


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    kb = kbs.sample_kb(workdir)
    base = [f"kb.path={kb['path']}", f"kb.collection={kb['collection']}"]
    if quick:
        # A toy run: 20 steps with one validation at the end.
        base += ["model=tiny", "data.block_size=64", "trainer.max_steps=20", "trainer.val_check_interval=20"]
        variants = {"default": lambda: train_once(workdir, "default", base)}
    else:
        base += ["model=small", "trainer.max_epochs=3"]
        variants = {
            "default": lambda: train_once(workdir, "default", base),
            "fp32": lambda: train_once(workdir, "fp32", [*base, "trainer.precision=32-true"]),
        }
    samples = harness.interleave(variants, rounds or 1, "e2e")
    s = harness.summarise(samples)
    comparison = "model=tiny 20 steps" if quick else "model=small 3 epochs"
    rows = [harness.row("e2e", comparison, "default", "wall", "s", s["default"]["seconds"])]
    rows.append(harness.row("e2e", comparison, "default", "final val/loss", "", s["default"]["val_loss"]))
    if "fp32" in s:
        rows.insert(
            1,
            harness.row(
                "e2e",
                comparison,
                "fp32",
                "wall",
                "s",
                s["fp32"]["seconds"],
                s["default"]["seconds"],
                "default",
            ),
        )
        rows.append(
            harness.row(
                "e2e",
                comparison,
                "fp32",
                "final val/loss",
                "",
                s["fp32"]["val_loss"],
                s["default"]["val_loss"],
                "default",
            )
        )
    m = {name: {k: v["median"] for k, v in stats.items()} for name, stats in s.items()}
    what = "20 steps of model=tiny" if quick else "3 epochs of model=small"
    result = f"{harness.num(m['default']['seconds'])} s, final val/loss {m['default']['val_loss']:.3f}"
    if "fp32" in m:
        result += f" (fp32: {harness.num(m['fp32']['seconds'])} s, {m['fp32']['val_loss']:.3f})"
    readme = [
        harness.readme_row(
            f"end to end: `scripts/train.py`, {what} on the sample KB, a fresh project root", result
        )
    ]
    details = {"overrides": base}
    return {
        "rows": rows,
        "targets": [],
        "readme": readme,
        "summaries": s,
        "samples": samples,
        "details": details,
    }


def main() -> None:
    harness.section_main(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
