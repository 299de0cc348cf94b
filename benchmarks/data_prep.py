"""Data preparation: kbtune's DataPreparation (export, clean, split, tokenize, pack, cache write) against
the raw limit (paged Chroma `get` + the Rust tokenizer's `encode_batch` + numpy packing) on a synthetic
KB, both with a ready tokenizer; the cached rerun; peak RSS at a small and a large KB, each measured in
its own process.

Standalone: `python benchmarks/data_prep.py [--quick]`; `--rss-child JSON` is the measured child."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import kbs

BLOCK = 256
PAGE = 5000  # the largest page Chroma answers quickly; one unpaged get of 50k documents fails


@contextlib.contextmanager
def tokenizer_parallelism(enabled: bool):
    """The Rust tokenizer reads TOKENIZERS_PARALLELISM at every call; kbtune's entry points set it to
    false, the raw limit uses both cores."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def load_tokenizer(directory: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def raw_limit(kb: dict[str, str], tokenizer: Any) -> dict[str, float]:
    """The least work that turns the collection into blocks: nothing kbtune adds (cleaning, dedup,
    split, manifest, cache) is done here."""
    import chromadb
    import numpy as np
    from chromadb.config import Settings

    collection = chromadb.PersistentClient(
        path=kb["path"], settings=Settings(anonymized_telemetry=False)
    ).get_collection(kb["collection"], embedding_function=None)
    backend, eos = tokenizer.backend_tokenizer, np.array([tokenizer.eos_token_id], dtype=np.int32)
    t0 = time.perf_counter()
    pieces, documents, offset = [], 0, 0
    with tokenizer_parallelism(True):
        while True:
            page = collection.get(limit=PAGE, offset=offset, include=["documents"])["documents"]
            if not page:
                break
            for enc in backend.encode_batch(page, add_special_tokens=False):
                pieces += (np.asarray(enc.ids, dtype=np.int32), eos)
            documents += len(page)
            offset += PAGE
    flat = np.concatenate(pieces)
    blocks = flat[: len(flat) // BLOCK * BLOCK].reshape(-1, BLOCK)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "documents": documents, "tokens": int(len(flat)), "blocks": int(blocks.shape[0]),
            "tokens_per_s": len(flat) / seconds}  # fmt: skip


def kbtune_prepare(kb: dict[str, str], tokenizer: Any, cache_dir: Path) -> tuple[dict[str, float], Any]:
    from kbtune.data.preparation import DataPreparation, DataSettings
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    knowledge_base = KnowledgeBase.connect(KBSettings(path=kb["path"], collection=kb["collection"]))
    preparation = DataPreparation(
        knowledge_base, DataSettings(block_size=BLOCK), lambda texts: tokenizer, cache_dir
    )
    t0 = time.perf_counter()
    prepared = preparation.prepare_dataset()
    seconds = time.perf_counter() - t0
    splits = prepared.manifest["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    return {"seconds": seconds, "documents": prepared.manifest["document_count"], "tokens": tokens,
            "blocks": sum(s["blocks"] for s in splits.values()), "tokens_per_s": tokens / seconds}, prepared  # fmt: skip


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's peak into a
    forked child across exec, so a child of a big benchmark process would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(args: dict[str, Any]) -> None:
    """Prepare one KB in this fresh process and print its peak RSS."""
    tokenizer = load_tokenizer(Path(args["tokenizer"]))
    import kbtune.data.preparation  # noqa: F401  (imported before the baseline is read)

    baseline = peak_rss_mb()
    sample, _ = kbtune_prepare(args["kb"], tokenizer, Path(args["cache_dir"]))
    peak = peak_rss_mb()
    print(json.dumps({**sample, "peak_rss_mb": peak, "import_rss_mb": baseline}))


def measure_rss(kb: dict[str, str], tokenizer_dir: Path, scratch: Path) -> dict[str, float]:
    cache = Path(tempfile.mkdtemp(dir=scratch))
    try:
        args = json.dumps({"kb": kb, "tokenizer": str(tokenizer_dir), "cache_dir": str(cache)})
        env = harness.bench_env(TOKENIZERS_PARALLELISM="false")
        _, proc = harness.run_timed([harness.PYTHON, __file__, "--rss-child", args], env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS child failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    main_size, rss_sizes = (2000, (500, 2000)) if quick else (50_000, (10_000, 100_000))
    rounds = rounds or (1 if quick else 3)
    collections = kbs.synthetic_kbs(workdir, sorted({main_size, *rss_sizes}))
    tokenizer_dir = kbs.ready_tokenizer(
        workdir, vocab_size=2048 if quick else 8192, documents=300 if quick else 2000
    )
    tokenizer = load_tokenizer(tokenizer_dir)
    scratch = workdir / "data_prep_scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    kb = collections[main_size]
    caches: list[Path] = []

    def fresh() -> dict[str, float]:
        caches.append(Path(tempfile.mkdtemp(dir=scratch)))
        # kbtune's entry points switch tokenizer parallelism off; whatever kbtune does about it is its own.
        with tokenizer_parallelism(False):
            sample, _ = kbtune_prepare(kb, tokenizer, caches[-1])
        return sample

    def cached() -> dict[str, float]:
        with tokenizer_parallelism(False):
            sample, prepared = kbtune_prepare(kb, tokenizer, caches[-1])
        assert prepared.cached, "the rerun did not hit the cache"
        shutil.rmtree(caches[-1], ignore_errors=True)
        return sample

    samples = harness.interleave(
        {"kbtune": fresh, "raw_limit": lambda: raw_limit(kb, tokenizer), "kbtune_cached": cached},
        rounds,
        "data",
    )
    rss = harness.interleave(
        {f"{n}_docs": lambda n=n: measure_rss(collections[n], tokenizer_dir, scratch) for n in rss_sizes},
        1,
        "rss",
    )
    shutil.rmtree(scratch, ignore_errors=True)
    s, r = harness.summarise(samples), harness.summarise(rss)
    small, large = (f"{n}_docs" for n in rss_sizes)
    comparison = f"prepare {main_size:,} docs"
    rows = [
        harness.row("data", comparison, "raw_limit", "time", "s", s["raw_limit"]["seconds"]),
        harness.row(
            "data",
            comparison,
            "kbtune",
            "time",
            "s",
            s["kbtune"]["seconds"],
            s["raw_limit"]["seconds"],
            "raw",
        ),
        harness.row("data", comparison, "kbtune_cached", "time", "s", s["kbtune_cached"]["seconds"]),
        harness.row("data", comparison, "raw_limit", "throughput", "tok/s", s["raw_limit"]["tokens_per_s"]),
        harness.row(
            "data",
            comparison,
            "kbtune",
            "throughput",
            "tok/s",
            s["kbtune"]["tokens_per_s"],
            s["raw_limit"]["tokens_per_s"],
            "raw",
        ),  # fmt: skip
        harness.row("data", "peak RSS", small, "peak RSS", "MB", r[small]["peak_rss_mb"]),
        harness.row(
            "data",
            "peak RSS",
            large,
            "peak RSS",
            "MB",
            r[large]["peak_rss_mb"],
            r[small]["peak_rss_mb"],
            small,
        ),
    ]
    speed = harness.ratio(s, "kbtune", "raw_limit", "tokens_per_s")
    targets = [
        harness.target(
            f"data preparation speed, {main_size:,} docs (x raw limit)", speed, ">=", 0.7, "raw limit"
        ),
        harness.target(
            f"cached rerun, {main_size:,} docs (s)", s["kbtune_cached"]["seconds"]["median"], "<=", 2.0
        ),
        harness.target(
            f"peak RSS {large} / {small}", harness.ratio(r, large, small, "peak_rss_mb"), "<=", 2.0, small
        ),
    ]
    details = {"documents": samples["raw_limit"][0]["documents"], "tokens": samples["raw_limit"][0]["tokens"],
               "kbtune_tokens": samples["kbtune"][0]["tokens"], "tokenizer": str(tokenizer_dir), "block_size": BLOCK,
               "raw_page_size": PAGE, "rss": rss}  # fmt: skip
    return {"rows": rows, "targets": targets, "summaries": {**s, **r}, "samples": samples, "details": details}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "kbtune-bench"))
    parser.add_argument("--rss-child")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(json.loads(args.rss_child))
        return
    result = run(Path(args.workdir) / ("quick" if args.quick else "full"), args.quick)
    print(json.dumps({k: result[k] for k in ("rows", "targets")}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
