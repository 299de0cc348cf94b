"""Start-up: `kbtune --help`, and the time from launching `python scripts/train.py` to its first
optimizer step, against the bare import time of the libraries training needs, each in a fresh
interpreter, interleaved: warm (the data cache and the MLflow store exist: a first, unmeasured run
creates them) and cold (every round a first run in its own fresh project root: it creates the store
and the data cache and trains the BPE tokenizer). And the first run's tokenizer training on its own:
kbtune's `train_bpe_tokenizer` on the sample KB's training texts at model=small's vocabulary, into an
empty cache dir, against the same call loading the cached tokenizer.

The first step is read from the run's own record, without instrumenting kbtune: with
`trainer.log_every_n_steps=1` Lightning logs `train/loss` to MLflow right after step 1, and MLflow
stamps the metric with the wall clock.

Standalone: `python benchmarks/startup.py [--quick]`."""

from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import kbs

LIBRARIES = ("torch", "pytorch_lightning", "transformers", "mlflow", "chromadb", "hydra")
VOCAB = 8192  # model=small's vocabulary


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


def train_texts(kb: dict[str, str]) -> list[str]:
    """The texts kbtune's tokenizer factory gets for this KB: the default data settings' training split,
    collected, cleaned and formatted by DataPreparation itself."""
    from kbtune.data.preparation import DataPreparation, DataSettings
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    knowledge_base = KnowledgeBase.connect(KBSettings(path=kb["path"], collection=kb["collection"]))
    docs, _ = DataPreparation(knowledge_base, DataSettings(), lambda texts: None, Path()).collect()
    return [d.prompt + d.formatted for d in docs if d.split == "train"]


def tokenizer_time(texts: list[str], cache_dir: Path) -> dict[str, float]:
    """kbtune's BPE tokenizer factory as DataPreparation calls it (tokenizer threads on): it trains into an
    empty cache dir, or fingerprints the texts and loads the tokenizer already there."""
    from kbtune.data.tokens import tokenizer_parallelism
    from kbtune.modeling.factory import train_bpe_tokenizer

    t0 = time.perf_counter()
    with tokenizer_parallelism():
        tokenizer = train_bpe_tokenizer(texts, VOCAB, cache_dir)
    return {"seconds": time.perf_counter() - t0, "vocab": float(len(tokenizer))}


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    rounds = rounds or (1 if quick else 3)
    kb = kbs.sample_kb(workdir)
    base = workdir / "startup"
    shutil.rmtree(base, ignore_errors=True)
    warm_root, scratch = base / "warm", base / "scratch"
    overrides = [f"kb.path={kb['path']}", f"kb.collection={kb['collection']}"]
    overrides += ["model=tiny", "data.block_size=64"] if quick else []
    # The warm runs' project: a first, unmeasured run creates the store and the data cache.
    warm_up = first_step_time(warm_root, overrides)
    harness.log(f"  [startup] first run in the warm root (unmeasured): {warm_up['seconds']:.2f}s")
    texts = train_texts(kb)
    tokenizer_time(texts, scratch / "cached")  # trains the one every load round reads
    counter = itertools.count()

    def cold() -> dict[str, float]:
        root = base / f"cold-{next(counter)}"
        shutil.rmtree(root, ignore_errors=True)
        try:
            return first_step_time(root, overrides)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def train_tokenizer() -> dict[str, float]:
        cache = Path(tempfile.mkdtemp(dir=scratch))
        try:
            return tokenizer_time(texts, cache)
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    samples = harness.interleave(
        {"kbtune_help": help_time, "bare_imports": import_time, "first_step_warm": lambda: first_step_time(warm_root, overrides),
         "first_step_cold": cold, "tokenizer_train": train_tokenizer,
         "tokenizer_load": lambda: tokenizer_time(texts, scratch / "cached")},
        rounds, "startup",
    )  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    s = harness.summarise(samples)
    m = {name: {k: v["median"] for k, v in stats.items()} for name, stats in s.items()}
    imports, warm, cold_s = (
        m["bare_imports"]["seconds"],
        m["first_step_warm"]["seconds"],
        m["first_step_cold"]["seconds"],
    )
    tok = f"BPE tokenizer, vocab {VOCAB}, {len(texts)} sample-KB training texts"
    rows = [
        harness.row("startup", "kbtune --help", "kbtune_help", "wall", "s", s["kbtune_help"]["seconds"]),
        harness.row("startup", "to first step", "bare_imports", "wall", "s", s["bare_imports"]["seconds"]),
        harness.row("startup", "to first step", "first_step_warm", "wall", "s", s["first_step_warm"]["seconds"],
                    s["bare_imports"]["seconds"], "bare_imports"),
        harness.row("startup", "to first step", "first_step_cold", "wall", "s", s["first_step_cold"]["seconds"],
                    s["bare_imports"]["seconds"], "bare_imports"),
        harness.row("startup", tok, "tokenizer_load", "wall", "s", s["tokenizer_load"]["seconds"]),
        harness.row("startup", tok, "tokenizer_train", "wall", "s", s["tokenizer_train"]["seconds"],
                    s["tokenizer_load"]["seconds"], "tokenizer_load"),
    ]  # fmt: skip
    targets = [
        harness.target("kbtune --help (s)", m["kbtune_help"]["seconds"], "<=", 0.5),
        harness.target(
            "first optimizer step (warm) - bare imports (s)", warm - imports, "<=", 3.0, "bare imports"
        ),
    ]
    model = "model=tiny" if quick else "model=small"
    libraries = "torch, Lightning, transformers, mlflow, chromadb, hydra"
    readme = [
        harness.readme_row("`kbtune --help`", f"**{harness.num(m['kbtune_help']['seconds'])} s**", "<= 0.5 s",
                           [targets[0]]),
        harness.readme_row(
            f"`python scripts/train.py` ({model}) to first optimizer step, warm (the MLflow store and the data "
            "cache exist)",
            f"**{harness.num(warm)} s** vs {harness.num(imports)} s bare import of {libraries}: "
            f"+{harness.num(warm - imports)} s",
            "<= imports + 3 s", [targets[1]],
        ),
        harness.readme_row(
            f"the same, cold: first run in a fresh project root (creates the MLflow store and the data cache, "
            f"trains the BPE tokenizer; {rounds} fresh root{'s' if rounds > 1 else ''})",
            f"**{harness.num(cold_s)} s** vs {harness.num(imports)} s bare imports: +{harness.num(cold_s - imports)} s",
        ),
        harness.readme_row(
            f"first-run tokenizer training: kbtune's BPE tokenizer, vocab {VOCAB}, on the sample KB's "
            f"{len(texts)} training texts",
            f"**{harness.num(m['tokenizer_train']['seconds'])} s** to train vs {harness.num(m['tokenizer_load']['seconds'])} s "
            f"to load the cached one (same call, texts fingerprinted): "
            f"{m['tokenizer_train']['seconds'] / m['tokenizer_load']['seconds']:.0f}x",
        ),
    ]  # fmt: skip
    details = {"libraries": list(LIBRARIES), "overrides": overrides, "warm_up_run": warm_up,
               "cold": "each round a first run in its own fresh project root",
               "tokenizer": f"train_bpe_tokenizer(training texts, {VOCAB}, cache dir): an empty cache dir "
                            "(train) vs the second call on one (load)", "train_texts": len(texts)}  # fmt: skip
    return {"rows": rows, "targets": targets, "readme": readme, "summaries": s, "samples": samples,
            "details": details}  # fmt: skip


def main() -> None:
    harness.section_main(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
