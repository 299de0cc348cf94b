"""What travels with an exported model: a model card (README.md: base model, training data, settings,
metrics) and an Ollama Modelfile (the file, its chat template, stop tokens, default parameters)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kbtune.generation import PLAIN_ASSISTANT, PLAIN_USER, GenerationSettings

_CARD_SETTINGS = (
    "model.name", "model.source", "model.path", "model.lora.r", "optim.learning_rate", "data.block_size",
    "data.batch_size", "trainer.max_epochs", "trainer.precision", "seed",
)  # fmt: skip
# A Hub model id ("owner/name"): only those are valid as `base_model` in the card's metadata.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+\Z")


def _setting(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def write_model_card(out_dir: Path | str, info: dict[str, Any]) -> Path:
    """README.md for an exported version: metadata, base model, data, settings, metrics, loading."""
    out = Path(out_dir)
    fmt = _cell(info.get("format"))
    base = info.get("base_model")
    front = ["---", f"library_name: {'gguf' if fmt == 'gguf' else 'transformers'}"]
    if isinstance(base, str) and _HUB_ID.match(base) and not Path(base).exists():
        front.append(f"base_model: {json.dumps(base)}")
    front += [
        "tags:",
        "- kbtune",
        "- text-generation",
        *([f"- {json.dumps(fmt)}"] if fmt != "unknown" else []),
        "---",
    ]
    settings = [f"| `{k}` | {_cell(_setting(info.get('config'), k))} |" for k in _CARD_SETTINGS]
    metrics = info.get("metrics") or {}
    metric_rows = [f"| `{k}` | {_cell(v)} |" for k, v in sorted(metrics.items())] or ["| unknown | unknown |"]
    body = [
        f"# {_cell(info.get('version'))}", "",
        f"Model version `{_cell(info.get('version'))}` (id `{_cell(info.get('version_id'))}`), trained by kbtune "
        f"session `{_cell(info.get('session_id'))}`; exported as {fmt} ({_cell(info.get('dtype'))}).", "",
        "## Base model", "", _cell(info.get("base_model")), "",
        "## Training data", "",
        f"- Collection: {_cell(info.get('collection'))}",
        f"- Manifest digest: {_cell(info.get('manifest_digest'))}",
        f"- Documents: {_cell(info.get('documents'))}", "",
        "## Training settings", "", "| setting | value |", "| --- | --- |", *settings, "",
        "## Metrics", "", "| metric | value |", "| --- | --- |", *metric_rows, "",
        "## How to load", "", *_loading(out, fmt), "",
    ]  # fmt: skip
    path = out / "README.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(front + body))
    return path


def _cell(value: Any) -> str:
    """A value for the card: "unknown" when missing, never a guess."""
    if value is None or value == "":
        return "unknown"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _loading(out: Path, fmt: str) -> list[str]:
    args, lines = f'"{out.name}"', []
    if fmt == "gguf":
        files = sorted(p.name for p in out.glob("*.gguf"))
        name = files[0] if len(files) == 1 else "<file>.gguf"
        args += f', gguf_file="{name}"'
        lines = [
            "With Ollama (the Modelfile beside this card): `ollama create <name> -f Modelfile`, then `ollama run <name>`.",
            "", f"With llama.cpp: `llama-cli -m {name}`.", "", "With transformers (needs the `gguf` package):", "",
        ]  # fmt: skip
    return [
        *lines, "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f"model = AutoModelForCausalLM.from_pretrained({args})", f"tokenizer = AutoTokenizer.from_pretrained({args})", "```",
    ]  # fmt: skip


# Go renditions of the chat templates kbtune recognises, by a marker their Jinja source contains,
# with the strings that end a turn.
_OLLAMA_TEMPLATES = {
    "<|im_start|>": (  # ChatML (Qwen and many others)
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_end|>", "<|im_start|>"),
    ),
    "<|start_header_id|>": (  # Llama 3
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|start_header_id|>"),
    ),
}
# No chat template: the transcript kbtune's own ChatSession writes, so Ollama sees the same prompts.
_PLAIN_TURN = '{{ if eq .Role "user" }}' + PLAIN_USER + "{{ .Content }}\n"
_PLAIN_TURN += '{{ else if eq .Role "assistant" }}' + PLAIN_ASSISTANT + " {{ .Content }}\n{{ end }}"
_PLAIN = "{{- range .Messages }}" + _PLAIN_TURN + "{{ end }}" + PLAIN_ASSISTANT


def ollama_template(chat_template: str | None) -> tuple[str, tuple[str, ...], str | None]:
    """(Go template, stop strings, a note when the template could not be translated)."""
    if not chat_template:
        return _PLAIN, ("User:",), None
    for marker, (template, stops) in _OLLAMA_TEMPLATES.items():
        if marker in chat_template:
            return template, stops, None
    return (
        "{{ .Prompt }}",
        (),
        "the chat template is neither ChatML nor Llama 3 style: prompts pass as they are",
    )


def write_modelfile(
    out_dir: Path | str, gguf_name: str, tokenizer: Any, settings: GenerationSettings | None = None,
    context_length: int | None = None,
) -> Path:  # fmt: skip
    """An Ollama Modelfile for the GGUF file `gguf_name` in `out_dir` (the context length is read
    from that file when not given)."""
    out = Path(out_dir)
    name = gguf_name if gguf_name.endswith(".gguf") else f"{gguf_name}.gguf"
    template, stops, note = ollama_template(getattr(tokenizer, "chat_template", None))
    if context_length is None and (out / name).exists():
        context_length = _gguf_context_length(out / name)
    lines = [f"FROM ./{name}", ""]
    if note:
        lines.append(f"# {note}")
    lines += [f'TEMPLATE """{template}"""', ""]
    lines += [
        f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys([tokenizer.eos_token, *stops]) if stop
    ]
    temperature = settings.temperature if settings else 0.7
    lines.append(f"PARAMETER temperature {temperature:g}")
    if settings:
        lines += [f"PARAMETER top_p {settings.top_p:g}", f"PARAMETER num_predict {settings.max_new_tokens}"]
        if settings.seed is not None:
            lines.append(f"PARAMETER seed {settings.seed}")
    known = f"PARAMETER num_ctx {context_length}" if context_length else None
    lines.append(known or "# num_ctx left to Ollama's default: the context length is unknown")
    path = out / "Modelfile"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _gguf_context_length(path: Path) -> int | None:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    field = arch and reader.get_field(f"{arch.contents()}.context_length")
    return int(field.contents()) if field else None
