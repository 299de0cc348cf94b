"""Taking a model version out of kbtune: a plain Hugging Face directory or one GGUF file (LoRA
adapters merged into their base on the way), with a model card, an Ollama Modelfile and a digest."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("LlamaForCausalLM",)
_TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# GGUF dtype -> llama.cpp's file type (the "mostly": 1-D tensors stay float32).
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
GGUF_DTYPES = tuple(_FILE_TYPES)
# Llama 3's pre-tokenizer split; llama.cpp knows it as "llama-bpe". A plain ByteLevel pre-tokenizer
# splits with GPT-2's regex, which llama.cpp calls "gpt-2".
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class ExportError(ValueError):
    """A model version that cannot be exported in the requested format."""


def load_for_export(version_dir: Path | str) -> tuple[Any, Any]:
    """The version's model in float32 with any LoRA adapter merged into its base, and its tokenizer."""
    from kbtune.model_manager import load_model_dir

    model, tokenizer = load_model_dir(Path(version_dir))
    # Merge in float32: a bf16/f16 base under LoRA would round the adapter's small update away.
    model = model.float()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        logger.info("merged the LoRA adapter of %s into its base model", version_dir)
    model.config.use_cache = True
    return model.eval(), tokenizer


def export_safetensors(version_dir: Path | str, out_dir: Path | str, dtype: str = "f32") -> Path:
    """A plain Hugging Face directory (model.safetensors, config.json, tokenizer files) that
    AutoModelForCausalLM loads without kbtune."""
    import torch

    if dtype not in _TORCH_DTYPES:
        raise ExportError(f"dtype: must be one of {', '.join(_TORCH_DTYPES)} for safetensors, got {dtype!r}")
    model, tokenizer = load_for_export(version_dir)
    model = model.to(getattr(torch, _TORCH_DTYPES[dtype]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    logger.info("exported %s as %s safetensors to %s", version_dir, dtype, out)
    return out


def export_gguf(version_dir: Path | str, out_path: Path | str, dtype: str = "f32") -> Path:
    """One GGUF file (llama.cpp / Ollama) with the weights, the config and the tokenizer."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ExportError(f"dtype: must be one of {', '.join(GGUF_DTYPES)} for GGUF, got {dtype!r}")
    model, tokenizer = load_for_export(version_dir)
    check_gguf_support(model)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a failed export never leaves a truncated .gguf.
    partial = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(partial), "llama")
    try:
        writer.add_name(out.stem)
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_llama_config(writer, model.config)
        _add_tokenizer(writer, tokenizer, model.get_input_embeddings().weight.shape[0])
        for name, array in _llama_tensors(model):
            _add_tensor(writer, name, array, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, out)
    logger.info("exported %s as %s GGUF to %s (%.1f MB)", version_dir, dtype, out, out.stat().st_size / 1e6)
    return out


def check_gguf_support(model: Any) -> None:
    """Raise ExportError unless the model is a Llama that llama.cpp's `llama` architecture describes."""
    arch = type(model).__name__
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ExportError(
            f"GGUF export does not support {arch} (model_type {model.config.model_type!r}); "
            f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)} (kbtune's model=small and model=tiny, "
            f"and LoRA versions of Llama models). Export it as safetensors instead."
        )
    config = model.config
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act} (llama.cpp's llama uses silu)")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(config, key, False):
            problems.append(f"{key}=true (biases are not exported)")
    rope_type = _rope(config)[1]
    if rope_type not in (None, "default"):
        problems.append(f"rope type {rope_type!r} (only unscaled RoPE is exported)")
    if problems:
        raise ExportError(f"GGUF export of this {arch} is not supported: " + "; ".join(problems))


def _rope(config: Any) -> tuple[float, str | None]:
    """(theta, rope type): transformers 5 keeps them in `rope_parameters`, 4.x in `rope_theta`/`rope_scaling`."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params.get("rope_type", params.get("type"))


def _add_llama_config(writer: Any, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(_rope(config)[0])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _add_tokenizer(writer: Any, tokenizer: Any, n_embeddings: int) -> None:
    """llama.cpp's "gpt2" (byte-level BPE) vocabulary: tokens in id order, their types, merges, special ids."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = _byte_level_pre(backend)
    if len(tokenizer) > n_embeddings:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {n_embeddings} embeddings"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added, kind = tokenizer.added_tokens_decoder, gguf.TokenType
    # Rows beyond the vocabulary (a padded embedding matrix) get llama.cpp's converter's [PAD<id>] names.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_embeddings)]
    types = [
        kind.UNUSED if i not in by_id else kind.NORMAL if i not in added
        else kind.CONTROL if added[i].special else kind.USER_DEFINED
        for i in range(n_embeddings)
    ]  # fmt: skip
    # tokenizers >= 0.20 stores merges as pairs, older versions as "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):  # fmt: skip
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bos is not None and full[: -len(plain)] == [bos])
    writer.add_add_eos_token(eos is not None and full[len(plain) :] == [eos])
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _byte_level_pre(backend: dict[str, Any]) -> str:
    """llama.cpp's name for how this byte-level BPE splits text before merging."""
    model, pre = backend.get("model", {}), backend.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export needs a byte-level BPE tokenizer; this one is {model.get('type')!r}")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = [(p.get("type"), (p.get("pattern") or {}).get("Regex")) for p in pre.get("pretokenizers") or []]
    if parts == [("Split", _LLAMA3_SPLIT), ("ByteLevel", None)]:
        return "llama-bpe"
    raise ExportError(
        "GGUF export supports byte-level BPE tokenizers that split like GPT-2 or Llama 3; "
        f"this one's pre-tokenizer is {json.dumps(pre)[:200]}"
    )


def _llama_tensors(model: Any) -> Any:
    """(GGUF name, float32 array) for each weight, q/k rows in llama.cpp's RoPE order."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"tensor {hf_name} has no GGUF name in llama.cpp's llama architecture")
        array = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            array = _rope_permute(array, n_head)
        elif hf_name.endswith("k_proj.weight"):
            array = _rope_permute(array, n_kv)
        yield name, array


def _rope_permute(weights: Any, n_head: int) -> Any:
    """transformers rotates dimension i with i + d/2 of each head; ggml's RoPE rotates adjacent
    pairs (2i, 2i+1), as Meta's original checkpoints did. Reorder the rows to match (transformers'
    GGUF loader undoes it)."""
    rows = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, 2, rows, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _add_tensor(writer: Any, name: str, array: Any, dtype: str) -> None:
    import gguf

    # As llama.cpp's converter: 1-D tensors (norms) stay float32 whatever the file type.
    if array.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, array)
    elif dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        # f16, and q8_0 rows that do not split into 32-value blocks (llama.cpp falls back the same way).
        writer.add_tensor(name, array.astype("float16"))


def sha256_of(path: Path | str) -> str:
    """Hex SHA-256 of a file, or of a directory's files (relative names and contents, in name order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f is not path:
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with f.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# The card and Modelfile written beside an export (their own module; importable from here too).
from kbtune.model_card import ollama_template, write_model_card, write_modelfile  # noqa: E402, F401
