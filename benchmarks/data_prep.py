"""Data preparation: kbtune's DataPreparation (export, digest, clean, split, tokenize, pack, cache write)
against the raw limit (Chroma `get` by id in pages + the Rust tokenizer's `encode_batch` + numpy
packing) on a synthetic KB, both with a ready tokenizer (as a local model brings: kbtune reads the KB
once, tokenizing as it goes); the cached rerun of `scripts/train.py`'s real data stage; and memory:
peak RSS above the import baseline at a small and a large KB, each in fresh processes, against the
bytes of the token arrays they produced.

The cached rerun is the path a user's second `scripts/train.py` takes: `open_project(overrides)`,
`project.service.prepare_training_data(project.plan())` with kbtune's own tokenizer provider: the
store found as the last run left it (its content epoch, kbtune.store_checks), so the corpus digest
recorded then holds and no document is read; the BPE tokenizer that digest names loaded from disk,
the cache key, the arrays mapped from the cache. (The rerun after another program opened the store,
which reads and hashes every document, is measured in fresh processes by data_scale.py.) The first such run (the digest pass, the
tokenizer trained on the streamed training texts, the tokenizing pass, the cache write) runs once
before the rounds and is reported on its own.

Standalone: `python benchmarks/data_prep.py [--quick]`; `--rss-child JSON` is the measured child
(benchmarks/data_scale.py uses it too)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
import kbs

BLOCK = 256
PAGE = 5000  # the largest page Chroma answers quickly; one unpaged get of 50k documents fails
ID_PAGE = 100_000  # ids-only pages
MB = 1024 * 1024


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
    # The ids first (ids-only pages are cheap), then the documents by id: a page read at an offset
    # costs Chroma time proportional to the offset, which at a million documents would slow the
    # limit down and flatter kbtune.
    ids, offset = [], 0
    while page := collection.get(limit=ID_PAGE, offset=offset, include=[])["ids"]:
        ids += page
        offset += ID_PAGE
    pieces, documents = [], 0
    with tokenizer_parallelism(True):
        for start in range(0, len(ids), PAGE):
            page = collection.get(ids=ids[start : start + PAGE], include=["documents"])["documents"]
            for enc in backend.encode_batch(page, add_special_tokens=False):
                pieces += (np.asarray(enc.ids, dtype=np.int32), eos)
            documents += len(page)
    flat = np.concatenate(pieces)
    blocks = flat[: len(flat) // BLOCK * BLOCK].reshape(-1, BLOCK)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "documents": documents, "tokens": int(len(flat)), "blocks": int(blocks.shape[0]),
            "tokens_per_s": len(flat) / seconds, "array_bytes": int(blocks.nbytes)}  # fmt: skip


def chroma_open(kb: dict[str, str]) -> dict[str, float]:
    """Open the collection, list its ids and read one page: Chroma's own memory once a collection is
    read (it loads the collection's vector index), which every reader pays."""
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    t0 = time.perf_counter()
    knowledge_base = KnowledgeBase.connect(KBSettings(path=kb["path"], collection=kb["collection"]))
    connected = time.perf_counter() - t0
    ids = knowledge_base.list_ids()
    next(knowledge_base.iter_raw(ids), None)
    return {"seconds": time.perf_counter() - t0, "connect_seconds": connected, "documents": len(ids), "array_bytes": 0}


def other_program_open(kb: dict[str, str]) -> dict[str, float]:
    """Another program opens the store with Chroma's own client and counts the collection: its start
    writes to the store (a row in Chroma's acquire_write table), as every Chroma client's does."""
    import chromadb
    from chromadb.config import Settings

    t0 = time.perf_counter()
    client = chromadb.PersistentClient(path=kb["path"], settings=Settings(anonymized_telemetry=False))
    documents = client.get_collection(kb["collection"]).count()
    return {"seconds": time.perf_counter() - t0, "documents": documents, "array_bytes": 0}


def array_bytes(prepared: Any) -> int:
    """Bytes of the token arrays a preparation produced: train + val blocks (+ their labels)."""
    arrays = (prepared.train, prepared.val, prepared.train_labels, prepared.val_labels)
    return int(sum(a.nbytes for a in arrays if a is not None))


class ReadyTokenizer:
    """The tokenizer factory of a model that brings its own tokenizer (model.source=local): it needs
    no corpus, so a first preparation reads the KB once, tokenizing as it goes."""

    needs_corpus = False

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, texts: Any) -> Any:
        return self.tokenizer


def kbtune_prepare(kb: dict[str, str], tokenizer: Any, cache_dir: Path) -> tuple[dict[str, float], Any]:
    """DataPreparation with a ready tokenizer, into an empty cache: preparation alone."""
    from kbtune.data.preparation import DataPreparation, DataSettings
    from kbtune.knowledge_base import KBSettings, KnowledgeBase

    knowledge_base = KnowledgeBase.connect(KBSettings(path=kb["path"], collection=kb["collection"]))
    preparation = DataPreparation(knowledge_base, DataSettings(block_size=BLOCK), ReadyTokenizer(tokenizer), cache_dir)
    t0 = time.perf_counter()
    prepared = preparation.prepare_dataset()
    seconds = time.perf_counter() - t0
    splits = prepared.manifest["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    return {"seconds": seconds, "documents": prepared.manifest["document_count"], "tokens": tokens,
            "blocks": sum(s["blocks"] for s in splits.values()), "tokens_per_s": tokens / seconds,
            "array_bytes": array_bytes(prepared)}, prepared  # fmt: skip


def project_overrides(kb: dict[str, str], root: Path) -> list[str]:
    """The overrides of the real runs: the synthetic KB, a scratch project root, model=small."""
    return [f"paths.root={root}", f"kb.path={kb['path']}", f"kb.collection={kb['collection']}",
            "model=small", f"data.block_size={BLOCK}"]  # fmt: skip


def real_prepare(
    overrides: list[str], opened: Callable[[], Any] | None = None
) -> tuple[dict[str, float], Any]:
    """`scripts/train.py`'s data stage in fresh objects: open the project, plan, and
    `service.prepare_training_data(plan)` with kbtune's own TokenizerProvider (trains the BPE
    tokenizer, or loads the one the corpus digest names), then the dataset
    (prepared, or the arrays loaded from the cache). `seconds` is the data stage; opening the project
    (Hydra, the MLflow store) is `open_seconds`, and `opened` is called between the two;
    `documents_read`: how many documents the data stage read from the KB."""
    from kbtune.knowledge_base import KnowledgeBase
    from kbtune.project import open_project

    # Counts the documents the data stage reads from the KB (a generator around each page: ~nothing).
    read, iter_raw = [0], KnowledgeBase.iter_raw

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        for page in iter_raw(self, *args, **kwargs):
            read[0] += len(page[0])
            yield page

    KnowledgeBase.iter_raw = counted  # type: ignore[method-assign]
    t0 = time.perf_counter()
    project = open_project(overrides)
    service, plan = project.service, project.plan()
    if opened is not None:
        opened()
    t1 = time.perf_counter()
    preparation = service.prepare_training_data(plan)
    prepared = preparation.prepare_dataset()
    seconds = time.perf_counter() - t1
    KnowledgeBase.iter_raw = iter_raw  # type: ignore[method-assign]
    splits = prepared.manifest["splits"]
    tokens = sum(s["tokens"] for s in splits.values())
    return {"seconds": seconds, "open_seconds": t1 - t0, "documents": prepared.manifest["document_count"],
            "tokens": tokens, "tokens_per_s": tokens / seconds, "cached": float(prepared.cached),
            "documents_read": read[0],
            "array_bytes": array_bytes(prepared)}, prepared  # fmt: skip


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
    """One measured run in this fresh process (mode `fresh`: kbtune with the ready tokenizer; `raw`: the
    raw limit; `real`: the real data stage, see real_prepare; `open`: chroma_open; `other_program`:
    other_program_open). Prints its figures with the peak RSS
    above the baseline read right after every import the run needs (`real`: after opening the project)."""
    import chromadb  # noqa: F401  (everything imported before the baseline is read)

    import kbtune.data.preparation  # noqa: F401
    import kbtune.knowledge_base  # noqa: F401

    mode = args.get("mode", "fresh")
    tokenizer = load_tokenizer(Path(args["tokenizer"])) if mode in ("fresh", "raw") else None
    baseline = peak_rss_mb()
    if mode == "open":
        sample = chroma_open(args["kb"])
    elif mode == "other_program":
        sample = other_program_open(args["kb"])
    elif mode == "fresh":
        with tokenizer_parallelism(False):  # as kbtune's entry points set it
            sample, _ = kbtune_prepare(args["kb"], tokenizer, Path(args["cache_dir"]))
    elif mode == "raw":
        sample = raw_limit(args["kb"], tokenizer)
    else:
        # The baseline after opening the project (Hydra, the MLflow store): the data stage's memory.
        def opened() -> None:
            nonlocal baseline
            baseline = peak_rss_mb()

        sample, prepared = real_prepare(args["overrides"], opened)
        if args.get("expect_cached") is not None and bool(prepared.cached) != args["expect_cached"]:
            raise SystemExit(f"expected cached={args['expect_cached']}, got {prepared.cached}")
    peak = peak_rss_mb()
    print(json.dumps({**sample, "peak_rss_mb": peak, "import_rss_mb": baseline, "rss_mb": peak - baseline,
                      "array_mb": sample["array_bytes"] / MB}))  # fmt: skip


def child(args: dict[str, Any], timeout: float = 7200) -> dict[str, float]:
    """rss_child in a fresh interpreter; its printed figures."""
    env = harness.bench_env(TOKENIZERS_PARALLELISM="false")
    _, proc = harness.run_timed(
        [harness.PYTHON, str(Path(__file__).resolve()), "--rss-child", json.dumps(args)],
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{args.get('mode', 'fresh')} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_rss(kb: dict[str, str], tokenizer_dir: Path, scratch: Path) -> dict[str, float]:
    """kbtune's fresh preparation (ready tokenizer) in a fresh process, into a fresh cache."""
    cache = Path(tempfile.mkdtemp(dir=scratch))
    try:
        return child({"mode": "fresh", "kb": kb, "tokenizer": str(tokenizer_dir), "cache_dir": str(cache)})
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    main_size, rss_sizes = (2000, (500, 2000)) if quick else (50_000, (10_000, 100_000))
    rss_rounds = rounds or (1 if quick else 3)
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
    overrides = project_overrides(kb, scratch / "project")

    # The first real run: trains kbtune's tokenizer on the KB's training texts and writes the cache.
    first, prepared = real_prepare(overrides)
    if prepared.cached:
        raise RuntimeError("the first run in a fresh project root found a cache")
    del prepared
    harness.log(f"  [data] first run (trains the tokenizer, writes the cache): {first['seconds']:.2f}s")

    def fresh() -> dict[str, float]:
        cache = Path(tempfile.mkdtemp(dir=scratch))
        # kbtune's entry points switch tokenizer parallelism off; whatever kbtune does about it is its own.
        with tokenizer_parallelism(False):
            sample, _ = kbtune_prepare(kb, tokenizer, cache)
        shutil.rmtree(cache, ignore_errors=True)
        return sample

    def cached() -> dict[str, float]:
        sample, prepared = real_prepare(overrides)
        assert prepared.cached, "the rerun did not hit the cache"
        return sample

    samples = harness.interleave(
        {"kbtune": fresh, "raw_limit": lambda: raw_limit(kb, tokenizer), "kbtune_cached": cached},
        rounds,
        "data",
    )
    rss = harness.interleave(
        {f"{n}_docs": lambda n=n: measure_rss(collections[n], tokenizer_dir, scratch) for n in rss_sizes},
        rss_rounds,
        "rss",
    )
    shutil.rmtree(scratch, ignore_errors=True)
    # Same tokenizer, same documents: the same tokens, so the tokens/s ratio is the time ratio.
    same = {x["tokens"] for name in ("kbtune", "raw_limit") for x in samples[name]}
    if len(same) != 1:
        raise RuntimeError(f"kbtune and the raw limit tokenized different amounts: {sorted(same)}")
    s, r = harness.summarise(samples), harness.summarise(rss)
    small, large = (f"{n}_docs" for n in rss_sizes)
    comparison = f"prepare {main_size:,} docs"
    memory = "peak RSS - imports"
    rows = [
        harness.row("data", comparison, "raw_limit", "time", "s", s["raw_limit"]["seconds"]),
        harness.row("data", comparison, "kbtune", "time", "s", s["kbtune"]["seconds"], s["raw_limit"]["seconds"], "raw_limit"),
        harness.row("data", comparison, "kbtune_cached", "time", "s", s["kbtune_cached"]["seconds"]),
        harness.row("data", comparison, "kbtune_first_run", "time", "s", harness.summary([first["seconds"]])),
        harness.row("data", comparison, "raw_limit", "throughput", "tok/s", s["raw_limit"]["tokens_per_s"]),
        harness.row("data", comparison, "kbtune", "throughput", "tok/s", s["kbtune"]["tokens_per_s"],
                    s["raw_limit"]["tokens_per_s"], "raw_limit"),
        harness.row("data", memory, small, "peak - imports", "MB", r[small]["rss_mb"]),
        harness.row("data", memory, large, "peak - imports", "MB", r[large]["rss_mb"], r[small]["rss_mb"], small),
    ]  # fmt: skip
    for name in (small, large):
        rows += [
            harness.row("data", "memory / token array bytes", name, "token arrays", "MB", r[name]["array_mb"]),
            harness.row("data", "memory / token array bytes", name, "peak - imports", "MB", r[name]["rss_mb"],
                        r[name]["array_mb"], "token arrays"),
        ]  # fmt: skip
    speed = harness.ratio(s, "kbtune", "raw_limit", "tokens_per_s")
    targets = [
        harness.target(
            f"data preparation speed, {main_size:,} docs (x raw limit)", speed, ">=", 0.7, "raw limit"
        ),
        harness.target(
            f"cached rerun, {main_size:,} docs (s)", s["kbtune_cached"]["seconds"]["median"], "<=", 2.0
        ),
        harness.target(
            f"peak RSS - imports, {large} / {small}",
            harness.ratio(r, large, small, "rss_mb"),
            "<=",
            2.0,
            small,
        ),
    ]
    m = {name: {k: v["median"] for k, v in stats.items()} for name, stats in {**s, **r}.items()}
    tokens = samples["raw_limit"][0]["tokens"]
    readme = [
        harness.readme_row(
            f"data preparation, {main_size:,} docs of ~150 words ({tokens / 1e6:.1f}M tokens)",
            f"kbtune {harness.num(m['kbtune']['seconds'])} s ({harness.num(m['kbtune']['tokens_per_s'])} tok/s) vs raw "
            f"limit (get by id in pages of {PAGE:,} + encode_batch + numpy packing) {harness.num(m['raw_limit']['seconds'])} s "
            f"({harness.num(m['raw_limit']['tokens_per_s'])} tok/s): **{speed:.2f}x**",
            ">= 0.7x",
            [targets[0]],
        ),
        harness.readme_row(
            f"cached rerun, {main_size:,} docs: `scripts/train.py`'s data stage, the store as the last run "
            "left it (no document read; loads the tokenizer, the cache key, maps the arrays)",
            f"**{harness.num(m['kbtune_cached']['seconds'])} s**; the first run, which trains the tokenizer "
            f"and writes the cache, {harness.num(first['seconds'])} s",
            "<= 2 s",
            [targets[1]],
        ),
        harness.readme_row(
            f"peak RSS above the imports, {rss_sizes[1]:,} vs {rss_sizes[0]:,} documents (median of "
            f"{rss_rounds} fresh process{'es' if rss_rounds > 1 else ''})",
            f"{harness.num(m[large]['rss_mb'])} MB vs {harness.num(m[small]['rss_mb'])} MB: **{targets[2]['value']:.2f}x**; "
            f"{m[large]['rss_mb'] / m[large]['array_mb']:.2f}x and {m[small]['rss_mb'] / m[small]['array_mb']:.2f}x "
            f"their token arrays ({harness.num(m[large]['array_mb'])} and {harness.num(m[small]['array_mb'])} MB)",
            "<= 2x",
            [targets[2]],
        ),
    ]  # fmt: skip
    details = {"documents": samples["raw_limit"][0]["documents"], "tokens": tokens,
               "kbtune_tokens": samples["kbtune"][0]["tokens"], "tokenizer": str(tokenizer_dir), "block_size": BLOCK,
               "raw_page_size": PAGE, "raw_id_page_size": ID_PAGE, "rss": rss, "first_run": first, "real_overrides": overrides,
               "cached_rerun": "real_prepare: open_project + service.prepare_training_data(plan) in fresh objects; "
                               "project opening excluded (open_seconds)",
               "memory": "VmHWM after preparing minus VmHWM right after the imports, in a fresh process; "
                         f"median of {rss_rounds}"}  # fmt: skip
    return {"rows": rows, "targets": targets, "readme": readme, "summaries": {**s, **r}, "samples": samples,
            "details": details}  # fmt: skip


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
    print(json.dumps({k: result[k] for k in ("rows", "targets", "readme")}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
