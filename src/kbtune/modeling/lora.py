"""LoRA with peft: which modules get adapters (per architecture, overridable), wrapping a model for
training, exporting it for a model version (adapter or merged), and loading an adapter version."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from kbtune.modeling.factory import (
    LoraSpec,
    ModelError,
    ModelSpec,
    build_model,
    local_dir_problems,
    scratch_config,
)

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The attention and MLP projections of the architectures kbtune is used with; names that a given
# model lacks are dropped, so one entry serves a family (Llama, Mistral, Qwen2/3, Gemma share theirs).
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KNOWN_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _PROJECTIONS,
    "mistral": _PROJECTIONS,
    "mixtral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": _PROJECTIONS,
    "qwen3": _PROJECTIONS,
    "gemma": _PROJECTIONS,
    "gemma2": _PROJECTIONS,
    "olmo": _PROJECTIONS,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}


def _adaptable_layers(model: Any) -> dict[str, str]:
    """Leaf name -> layer type of every Linear / GPT-2 Conv1D, except the output head (the LM head
    is tied to the embeddings in most models; adapting it would untie them)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if module is head or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        out.setdefault(name.rsplit(".", 1)[-1], type(module).__name__)
    return out


def resolve_targets(model: Any, requested: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The module names LoRA adapts in `model`: `requested` if given (each must exist), else the
    architecture's projections, else every Linear/Conv1D but the output head."""
    layers = _adaptable_layers(model)
    if requested:
        missing = [n for n in requested if n not in layers]
        if missing:
            raise ModelError(
                f"model.lora.target_modules: {missing} match no Linear/Conv1D layer of this "
                f"{model.config.model_type} model (it has: {', '.join(sorted(layers))})"
            )
        return tuple(requested)
    known = [n for n in KNOWN_TARGETS.get(model.config.model_type, ()) if n in layers]
    targets = tuple(known) or tuple(sorted(layers))
    if not targets:
        raise ModelError(f"model.lora: the {model.config.model_type} model has no Linear layers to adapt")
    return targets


def lora_problems(spec: ModelSpec) -> list[str]:
    """Check the LoRA targets against the model's structure, built on the meta device (no weights,
    no memory), so a wrong `target_modules` stops the run before anything is written."""
    if spec.lora is None or not spec.lora.target_modules:
        return []
    if spec.source == "local" and local_dir_problems(spec.path, spec.trust_remote_code):
        return []  # the directory problems are reported by the spec itself
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.source == "local":
        config = AutoConfig.from_pretrained(str(spec.path), trust_remote_code=spec.trust_remote_code)
    else:
        config = scratch_config(spec)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
    try:
        resolve_targets(skeleton, spec.lora.target_modules)
    except ModelError as exc:
        return [str(exc)]
    return []


def apply_lora(model: Any, spec: LoraSpec) -> Any:
    """Wrap `model` with LoRA adapters; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, spec.target_modules)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights transposed (in, out); peft must know to adapt them right.
        fan_in_fan_out=any(_adaptable_layers(model)[t] == "Conv1D" for t in targets),
    )
    if getattr(model, "is_activation_checkpointing", None) or getattr(model, "is_gradient_checkpointing", False):
        # With the embeddings frozen, reentrant checkpointing would see inputs without grad and skip
        # the adapters' backward; this makes the embedding output require grad.
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, config)
    trainable, total = trainable_parameters(peft_model)
    logger.info(
        "LoRA r=%d alpha=%d on %s: %d of %d parameters trainable (%.3f%%)",
        spec.r, spec.alpha, ", ".join(targets), trainable, total, 100 * trainable / max(total, 1),
    )  # fmt: skip
    return peft_model


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def export_for_saving(model: Any, merge: bool) -> Any:
    """What a LoRA model version stores: the adapter alone (it names its base model in the spec
    saved beside it), or with `merge` the base with the adapter folded into its weights. Merging
    happens in place: call it only once training is over."""
    base = model.merge_and_unload() if merge else model.get_base_model()
    # Training may have turned the KV cache off for gradient checkpointing; generation wants it.
    base.config.use_cache = True
    return base if merge else model


def load_adapter_dir(directory: Path | str, trust_remote_code: bool = False) -> Any:
    """A saved adapter version applied to its base model (rebuilt from the spec saved with it: the
    local checkpoint it names, or the seeded scratch init), in eval mode."""
    from peft import PeftModel

    from kbtune.model_manager import SPEC_FILE

    directory = Path(directory)
    if not (directory / ADAPTER_WEIGHTS).exists():
        raise ModelError(
            f"{directory} has an adapter_config.json but no {ADAPTER_WEIGHTS} (safetensors only)"
        )
    if not (directory / SPEC_FILE).exists():
        raise ModelError(f"{directory} has an adapter but no {SPEC_FILE} naming its base model")
    spec = ModelSpec.from_dict(json.loads((directory / SPEC_FILE).read_text()))
    base_spec = replace(spec, lora=None, gradient_checkpointing=False, trust_remote_code=trust_remote_code)
    if spec.source == "local":
        problems = local_dir_problems(spec.path, trust_remote_code)
        if problems:
            raise ModelError(
                f"the adapter in {directory} needs its base model {spec.path}: " + "; ".join(problems)
            )
    base = build_model(base_spec)
    model = PeftModel.from_pretrained(base, str(directory), is_trainable=False)
    model.eval()
    return model
