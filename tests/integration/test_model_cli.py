"""`kbtune generate|chat|export` as subprocesses on a version trained for 10 steps: greedy text that
repeats and equals transformers' own `generate`, a chat reply, a GGUF export with its model card,
Modelfile and recorded digest, and the errors that name the flag or the folder to change."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kbtune.generation import ChatSession, GenerationSettings
from kbtune.hydra_entry import compose
from kbtune.jobs import train
from kbtune.project import open_project

# Each `kbtune` call starts a Python that imports torch and transformers (seconds here).
pytestmark = pytest.mark.slow

PROMPT = "The on-call engineer"
NEW_TOKENS = 24
ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_kb) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("model-cli")
    train(compose([f"paths.root={root}", f"kb.path={small_kb['path']}", f"kb.collection={small_kb['collection']}",
                   "model=tiny", "data.block_size=64", "trainer.max_steps=10", "trainer.enable_progress_bar=false",
                   "eval.after_training=false"]))  # fmt: skip
    return {"root": root, "overrides": [f"paths.root={root}"]}


def kbtune_command() -> list[str]:
    entry = Path(sys.executable).parent / "kbtune"
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "kbtune"]


def start(trained: dict[str, Any], *args: str, stdin: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*kbtune_command(), *args, *trained["overrides"]], cwd=trained["root"], env=ENV, text=True,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def finish(proc: subprocess.Popen, stdin: str | None = None) -> subprocess.CompletedProcess:
    out, err = proc.communicate(stdin, timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def runs(trained) -> dict[str, subprocess.CompletedProcess]:
    """The independent calls at once: each pays the interpreter's start-up, the machine has cores."""
    flags = ["--max-new-tokens", str(NEW_TOKENS)]
    chat_input = "hello\n/exit\nnot read\n"
    procs = {
        "generate 1": (start(trained, "generate", "v1", PROMPT, *flags), None),
        "generate 2": (start(trained, "generate", "v1", PROMPT, *flags), None),
        "chat": (start(trained, "chat", "v1", *flags, stdin=chat_input), chat_input),
        "bad flags": (start(trained, "generate", "v1", PROMPT, "--temperature", "-1", "--top-p", "0"), None),
        "export": (start(trained, "export", "v1", "--format", "gguf"), None),
    }
    return {name: finish(proc, stdin) for name, (proc, stdin) in procs.items()}


@pytest.fixture(scope="module")
def model(trained):
    return open_project(trained["overrides"]).manager.load_model("v1")


def test_generate_is_greedy_repeatable_and_equals_transformers_generate(runs, model):
    first, second = runs["generate 1"], runs["generate 2"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == second.stdout
    lm, tokenizer = model
    ids = tokenizer(PROMPT).input_ids
    out = lm.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS)
    expected = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert expected and first.stdout == expected + "\n"


def test_bad_settings_are_exit_2_naming_each_flag(runs):
    proc = runs["bad flags"]
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("kbtune: error: --temperature: must be") and "--top-p: must be" in proc.stderr


def test_chat_prints_the_reply_of_a_chat_session_and_ends_at_exit(runs, model):
    proc = runs["chat"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    reply = "".join(ChatSession(*model, GenerationSettings(max_new_tokens=NEW_TOKENS)).send("hello"))
    # One reply: the lines after /exit were never sent.
    assert reply and proc.stdout == reply + "\n"


def test_export_gguf_writes_card_and_modelfile_records_the_digest_and_refuses_a_full_folder(runs, trained):
    proc = runs["export"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = trained["root"] / "exports" / "v1-gguf"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "v1-f32.gguf"]
    assert f"ollama create kb-v1 -f {out / 'Modelfile'}" in proc.stdout and "ollama run kb-v1" in proc.stdout
    assert (out / "Modelfile").read_text().startswith("FROM ./v1-f32.gguf\n")

    store = open_project(trained["overrides"]).store
    mv = store.get_version("v1")
    record = json.loads(store.get_version_tags(mv.id)["kbtune.export.gguf"])
    digest = hashlib.sha256((out / "v1-f32.gguf").read_bytes()).hexdigest()
    assert record["sha256"] == digest and Path(record["path"]) == out.resolve() and record["dtype"] == "f32"
    manifest = json.loads(store.read_text(mv.training_session_id, "data/manifest.json"))
    card = (out / "README.md").read_text()
    for fact in (f"session `{mv.training_session_id}`", "trained from scratch (model=tiny)",
                 f"Manifest digest: {manifest['cache_key']}", f"Documents: {manifest['document_count']}",
                 f"Collection: {manifest['collection']}", "| `train/loss` |"):  # fmt: skip
        assert fact in card, fact

    again = finish(start(trained, "export", "v1", "--format", "gguf"))
    assert again.returncode == 2 and "is not empty" in again.stderr and str(out) in again.stderr
    assert hashlib.sha256((out / "v1-f32.gguf").read_bytes()).hexdigest() == digest
