"""`kbtune generate|chat|export`: use a trained model version from the terminal (stream a
continuation, chat, or write it out as safetensors or GGUF with a model card and an Ollama Modelfile)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kbtune.project import open_project

FORMATS = ("safetensors", "gguf")
DTYPES = ("f32", "f16", "bf16", "q8_0")
_FORMAT_DTYPES = {"safetensors": ("f32", "f16", "bf16"), "gguf": ("f32", "f16", "q8_0")}
# The flag each generation setting comes from, so an error names what the user typed.
_FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "seed": "--seed",
}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy, the same text every call"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    p.add_argument("--seed", type=int, help="makes sampling repeatable (default: a fresh seed per call)")


def _fail(message: str) -> int:
    print(f"kbtune: error: {message}", file=sys.stderr)
    return 2


def _settings(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The generation settings and their problems, each led by its flag."""
    from kbtune.generation import GenerationSettings

    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    problems = []
    for problem in settings.validate():
        key, _, rest = problem.partition(":")
        problems.append(f"{_FLAGS.get(key, key)}:{rest}")
    return settings, problems


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    from kbtune.generation import stream_generate

    settings, problems = _settings(args)
    if problems:
        return _fail("; ".join(problems))
    model, tokenizer = open_project(args.overrides).manager.load_model(args.version)
    for piece in stream_generate(model, tokenizer, args.prompt, settings):
        _write(piece)
    _write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """One reply per stdin line, streamed; ends at EOF or `/exit`. The history stays in the prompt
    (its oldest turns leave it when it outgrows the model's context)."""
    from kbtune.generation import ChatSession

    settings, problems = _settings(args)
    if problems:
        return _fail("; ".join(problems))
    model, tokenizer = open_project(args.overrides).manager.load_model(args.version)
    chat = ChatSession(model, tokenizer, settings)
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting with {args.version}: type a message; /exit or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("you> " if tty else "")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip():
            for piece in chat.send(line):
                _write(piece)
            _write("\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kbtune.export import ExportError

    if args.dtype not in _FORMAT_DTYPES[args.format]:
        return _fail(
            f"--dtype: {args.format} takes {', '.join(_FORMAT_DTYPES[args.format])}, not {args.dtype}"
        )
    project = open_project(args.overrides)
    mv, version_dir = project.manager.model_dir(args.version)
    out = Path(args.out) if args.out else project.runtime.root / "exports" / f"{mv.version}-{args.format}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # Never mix two exports' files: a stale weights file beside a new card would lie.
        raise FileExistsError(f"--out: {out} exists and is not empty; remove it or choose another --out")
    try:
        written, digest = _export_files(args.format, args.dtype, version_dir, out, mv.version)
    except ExportError as exc:
        return _fail(str(exc))
    info = card_info(project.store, mv, args.format, args.dtype)
    from kbtune.model_card import write_model_card

    card = write_model_card(out, info)
    record = {"path": str(out.resolve()), "file": written.name, "dtype": args.dtype, "sha256": digest,
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    project.store.set_version_tags(mv.id, {f"kbtune.export.{args.format}": json.dumps(record)})
    print(f"exported version {mv.version} (id {mv.id}) as {args.format} {args.dtype} to {out}")
    print(f"  {written.name}  sha256 {digest}\n  {card.name}  (model card)")
    if args.format == "gguf":
        name = f"kb-{mv.version.lower()}"
        print(
            f"  Modelfile  (Ollama)\n\nIn Ollama:\n  ollama create {name} -f {out / 'Modelfile'}\n  ollama run {name}"
        )
    return 0


def _export_files(fmt: str, dtype: str, version_dir: Path, out: Path, label: str) -> tuple[Path, str]:
    """Write the weights (and for GGUF the Modelfile); returns the file whose digest is recorded."""
    from kbtune.export import export_gguf, export_safetensors, sha256_of

    if fmt == "gguf":
        from transformers import AutoTokenizer

        from kbtune.model_card import write_modelfile

        path = export_gguf(version_dir, out / f"{label}-{dtype}.gguf", dtype)
        write_modelfile(out, path.name, AutoTokenizer.from_pretrained(str(version_dir)))
        return path, sha256_of(path)
    export_safetensors(version_dir, out, dtype)
    weights = sorted(out.glob("*.safetensors"))
    # One weights file (kbtune's own models): its digest, as `sha256sum` gives it; a sharded
    # checkpoint: the digest of the directory's files (kbtune.export.sha256_of), card not yet written.
    path = weights[0] if len(weights) == 1 else out
    return path, sha256_of(path)


def card_info(store: Any, mv: Any, fmt: str, dtype: str) -> dict[str, Any]:
    """What the model card says about a version, all read from the store: unknown stays unknown."""
    session = store.get_session(mv.training_session_id)
    config = session.config or {}
    model = config.get("model") or {}
    try:
        manifest = json.loads(store.read_text(mv.training_session_id, "data/manifest.json"))
    except Exception:  # a session recorded before manifests were stored
        manifest = {}
    if model.get("source") == "local" and model.get("path"):
        base = model["path"]
    else:
        base = f"trained from scratch (model={model.get('name', 'unknown')})"
    return {
        "format": fmt, "dtype": dtype, "version": mv.version, "version_id": mv.id,
        "session_id": mv.training_session_id, "base_model": base,
        "collection": manifest.get("collection") or (config.get("kb") or {}).get("collection"),
        "manifest_digest": manifest.get("cache_key"), "documents": manifest.get("document_count"),
        "config": config, "metrics": dict(mv.metrics or {}),
    }  # fmt: skip
