"""Generation speed on one trained version (model=small trained briefly; model=tiny when quick):
kbtune's streamed greedy decoding (the loop under `stream_generate`: token by token with the KV cache,
each piece decoded as it is produced) vs transformers' `model.generate(do_sample=False)`, the same
prompt and exactly 128 new tokens (EOS does not stop either: a briefly trained model may end after a
few tokens), interleaved; and the time to the first streamed piece through the API (a real uvicorn on
loopback, `kbtune serve` in its own process, server-sent events read with httpx) with the model
cache cold (the request loads the version) and warm, and the stream's tokens/s as the client sees it.

Standalone: `python benchmarks/generation.py [--quick]`."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness
import kbs

NEW_TOKENS = 128
PROMPT = "The on-call engineer checks the"


def train_version(workdir: Path, quick: bool) -> list[str]:
    from kbtune.hydra_entry import compose
    from kbtune.jobs import train

    kb = kbs.sample_kb(workdir)
    root = workdir / "generation"
    shutil.rmtree(root, ignore_errors=True)
    size = (
        ["model=tiny", "data.block_size=64", "trainer.max_steps=20"]
        if quick
        else ["model=small", "trainer.max_steps=60"]
    )
    overrides = [f"paths.root={root}", f"kb.path={kb['path']}", f"kb.collection={kb['collection']}", *size,
                 "trainer.enable_progress_bar=false", "eval.after_training=false", "version=bench"]  # fmt: skip
    train(compose(overrides))
    return overrides


def decoding(model: Any, tokenizer: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The two measured calls, and the text each produced last (greedy: they should agree)."""
    import torch

    from kbtune.generation import GenerationSettings, GenerationStats, stream_from_ids

    ids = tokenizer(PROMPT).input_ids
    texts: dict[str, str] = {}

    def kbtune_stream() -> dict[str, float]:
        stats = GenerationStats()
        t0 = time.perf_counter()
        # stream_generate's own loop with no stop ids (it adds only the tokenizing of the prompt).
        pieces = stream_from_ids(model, tokenizer, ids, GenerationSettings(NEW_TOKENS), set(), stats)
        texts["kbtune"] = "".join(pieces)
        seconds = time.perf_counter() - t0
        return {"tokens_per_s": stats.tokens / seconds, "tokens": float(stats.tokens), "seconds": seconds}

    def transformers_generate() -> dict[str, float]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None
            )
        seconds = time.perf_counter() - t0
        texts["transformers"] = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        tokens = out.shape[1] - len(ids)
        return {"tokens_per_s": tokens / seconds, "tokens": float(tokens), "seconds": seconds}

    return {"kbtune streamed": kbtune_stream, "transformers generate": transformers_generate}, texts


class Server:
    """`kbtune serve` in its own process, as users run it: torch in the measuring process would
    share the cores' OpenMP threads with the server's, which halved the server's speed here. With a
    zero cache budget the server keeps only the version used last, so alternating two versions of
    the same files loads one on every switch (cold) and reuses it on a repeat (warm)."""

    def __init__(self, overrides: list[str]):
        import httpx

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{port}"
        env = harness.bench_env(KBTUNE_MODEL_CACHE_MB="0")
        cmd = [harness.PYTHON, "-m", "kbtune", "serve", "--port", str(port), *overrides]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("kbtune serve did not start") from None
            time.sleep(0.2)
        self.last = ""

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def first_piece(self, cold: bool) -> dict[str, float]:
        """Seconds to the first `data:` line, and the whole stream's tokens/s as the client saw it
        (the route stops at EOS, so the token count is the `done` event's)."""
        import httpx

        version = ("bench-b" if self.last == "bench" else "bench") if cold else (self.last or "bench")
        self.last = version
        t0 = time.perf_counter()
        first, done, tokens = None, False, 0
        body = {"prompt": PROMPT, "max_new_tokens": NEW_TOKENS}
        with httpx.stream(
            "POST", f"{self.url}/models/{version}/generate", json=body, timeout=300
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if first is None and line.startswith("data: "):
                    first = time.perf_counter() - t0
                elif done and line.startswith("data: "):
                    tokens = json.loads(line.removeprefix("data: "))["tokens"]
                done = done or line == "event: done"
        total = time.perf_counter() - t0
        if first is None or not done:
            raise RuntimeError("the stream ended without a piece of text or without its done event")
        return {"first_token_s": first, "total_s": total, "stream_tokens_per_s": tokens / total}


def run(workdir: Path, quick: bool, rounds: int | None = None) -> dict[str, Any]:
    from kbtune.project import open_project

    overrides = train_version(workdir, quick)
    project = open_project(overrides)
    # A second version of the same files: the server's cold loads alternate between the two.
    project.manager.save_model("bench-b", project.store.get_version("bench").training_session_id)
    model, tokenizer = project.manager.load_model("bench")
    variants, texts = decoding(model, tokenizer)
    variants["transformers generate"]()  # warm-up: the first call of each pays one-off set-up
    variants["kbtune streamed"]()
    decoded = harness.interleave(variants, rounds or (2 if quick else 5), "decoding")

    server = Server(overrides)
    try:
        server.first_piece(cold=True)  # the server's imports and first-request set-up, unmeasured
        api = harness.interleave({"cold cache": lambda: server.first_piece(cold=True),
                                  "warm cache": lambda: server.first_piece(cold=False)},
                                 rounds or (2 if quick else 5), "api")  # fmt: skip
    finally:
        server.stop()
    d, a = harness.summarise(decoded), harness.summarise(api)
    size = f"{'model=tiny' if quick else 'model=small'}, greedy, {NEW_TOKENS} new tokens"
    kb_, hf = d["kbtune streamed"], d["transformers generate"]
    rows = [
        harness.row("generation", size, "kbtune streamed", "throughput", "tok/s", kb_["tokens_per_s"],
                    hf["tokens_per_s"], "transformers generate"),
        harness.row("generation", size, "transformers generate", "throughput", "tok/s", hf["tokens_per_s"]),
        harness.row("generation", "API, SSE over loopback", "cold cache", "first token", "s", a["cold cache"]["first_token_s"]),
        harness.row("generation", "API, SSE over loopback", "warm cache", "first token", "s", a["warm cache"]["first_token_s"],
                    a["cold cache"]["first_token_s"], "cold cache"),
        harness.row("generation", "API, SSE over loopback", "warm cache", "stream throughput", "tok/s",
                    a["warm cache"]["stream_tokens_per_s"], kb_["tokens_per_s"], "kbtune streamed"),
    ]  # fmt: skip
    ratio = harness.ratio(d, "kbtune streamed", "transformers generate", "tokens_per_s")
    targets = [
        harness.target("generate tokens/s >= 0.95x transformers", ratio, ">=", 0.95, "transformers generate")
    ]

    def spread(stats: dict[str, Any]) -> str:
        return (
            f"{harness.num(stats['median'])} tok/s ({harness.num(stats['min'])}..{harness.num(stats['max'])})"
        )

    first_warm, first_cold = (
        a["warm cache"]["first_token_s"]["median"],
        a["cold cache"]["first_token_s"]["median"],
    )
    readme = [
        harness.readme_row(
            f"generation, {size}",
            f"kbtune's streamed decoding {spread(kb_['tokens_per_s'])} vs `model.generate` {spread(hf['tokens_per_s'])}: "
            f"**{ratio:.2f}x**; through the API (`kbtune serve`, SSE on loopback) first token after "
            f"**{harness.num(first_warm)} s** warm, {harness.num(first_cold)} s with the version loaded by the request, "
            f"the whole stream {harness.num(a['warm cache']['stream_tokens_per_s']['median'])} tok/s",
            ">= 0.95x `generate`", targets,
        )
    ]  # fmt: skip
    details = {"overrides": overrides, "prompt": PROMPT, "same_text": texts["kbtune"] == texts["transformers"],
               "tokens": {name: s["tokens"]["median"] for name, s in d.items()}}  # fmt: skip
    return {
        "rows": rows,
        "targets": targets,
        "readme": readme,
        "summaries": {**d, **a},
        "samples": {**decoded, **api},
        "details": details,
    }


def main() -> None:
    harness.section_main(run, __doc__)


if __name__ == "__main__":
    sys.exit(main())
