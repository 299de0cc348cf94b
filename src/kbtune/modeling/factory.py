"""Model and tokenizer factory: `scratch` models built from a transformers config with a BPE tokenizer
trained on the training split, or `local` Hugging Face directories loaded from disk (safetensors only)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sized
from dataclasses import asdict, field, replace
from pathlib import Path
from typing import Any, Literal

from kbtune.settings_base import settings

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
DTYPES = ("float32", "bfloat16", "float16")
# config.json keys that hold a model's context length, by architecture family.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


class ModelError(ValueError):
    """A model directory or spec that cannot be used."""


@settings
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Empty: detected from the architecture (attention and MLP projections).
    target_modules: tuple[str, ...] = ()


@settings
class ModelSpec:
    """Everything needed to rebuild the model; saved in checkpoints as plain values."""

    name: str = "small"
    source: Literal["scratch", "local"] = "scratch"
    # Built from scratch: llama or gpt2. A local model's saved spec records its config's model_type.
    architecture: str = "llama"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    intermediate_size: int = 768
    dropout: float = 0.0
    vocab_size: int = 8192
    max_position: int = 256
    path: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # The weights' dtype: bfloat16/float16 halve the memory of a frozen base under LoRA.
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    init_seed: int = 0
    lora: LoraSpec | None = None
    # Filled in once the tokenizer exists (scratch: trained and saved; local: the model's own).
    tokenizer_dir: str | None = field(default=None)

    def validate(self) -> list[str]:
        p = []
        if self.source not in ("scratch", "local"):
            p.append(f"model.source: must be 'scratch' or 'local', got {self.source!r}")
        if self.source == "scratch":
            if self.architecture not in ("llama", "gpt2"):
                p.append(f"model.architecture: must be 'llama' or 'gpt2', got {self.architecture!r}")
            for key in ("n_layer", "n_head", "n_embd", "intermediate_size", "max_position"):
                if getattr(self, key) < 1:
                    p.append(f"model.{key}: must be >= 1, got {getattr(self, key)}")
            if self.n_head >= 1 and self.n_embd % self.n_head:
                p.append(f"model.n_embd: {self.n_embd} is not divisible by model.n_head={self.n_head}")
            if self.vocab_size < 64 + len(SPECIAL_TOKENS):
                p.append(f"model.vocab_size: must be >= {64 + len(SPECIAL_TOKENS)}, got {self.vocab_size}")
        else:
            p.extend(local_dir_problems(self.path, self.trust_remote_code))
        if self.dtype not in DTYPES:
            p.append(f"model.dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        elif self.dtype != "float32" and self.lora is None:
            # The optimizer would update half-precision weights directly and lose small updates.
            p.append(f"model.dtype: {self.dtype} is for a frozen base under LoRA (add finetune=lora); full fine-tuning needs float32")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.lora is not None:
            if self.lora.r < 1:
                p.append(f"model.lora.r: must be >= 1, got {self.lora.r}")
            if not 0.0 <= self.lora.dropout < 1.0:
                p.append(f"model.lora.dropout: must be in [0, 1), got {self.lora.dropout}")
        return p

    def describing(self, model: Any) -> ModelSpec:
        """This spec with the sizes of the model it built: for a local checkpoint the spec's own size
        fields are placeholders, and the saved spec must describe the actual model."""
        if self.source != "local":
            return self
        config = model.config  # a peft model forwards to its base's config
        read = {"architecture": "model_type", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                "n_embd": "hidden_size", "intermediate_size": "intermediate_size", "vocab_size": "vocab_size",
                "max_position": "max_position_embeddings"}  # fmt: skip
        found = {key: getattr(config, attr) for key, attr in read.items() if getattr(config, attr, None) is not None}
        return replace(self, **found)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.lora is not None:
            data["lora"]["target_modules"] = list(self.lora.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        lora = data.pop("lora", None)
        if lora is not None:
            lora = LoraSpec(**{**lora, "target_modules": tuple(lora.get("target_modules") or ())})
        return cls(**data, lora=lora)


def local_dir_problems(path: str | None, trust_remote_code: bool = False) -> list[str]:
    """Why a local model directory cannot be loaded: safetensors weights, a config and a fast tokenizer
    are required, and code shipped with the model runs only when the user allows it."""
    if not path:
        return ["model.path: required for model=local (a local Hugging Face model directory)"]
    d = Path(path)
    if not d.is_dir():
        return [f"model.path: {path} is not a directory"]
    problems = []
    if not (d / "config.json").exists():
        problems.append(f"model.path: {path} has no config.json")
    elif _read_json(d / "config.json") is None:
        problems.append(f"model.path: {path}/config.json is not a JSON object")
    if not any(d.glob("*.safetensors")):
        # Pickled weights can run arbitrary code when loaded: never fall back to them.
        pickled = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (only pickle weights found: {', '.join(sorted(pickled)[:3])}; convert them to safetensors)" if pickled else ""
        problems.append(f"model.path: {path} has no *.safetensors weights{hint}")
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        problems.append(f"model.path: {path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json) beside the weights")
    if not trust_remote_code:
        for name in ("config.json", "tokenizer_config.json"):
            auto_map = (_read_json(d / name) or {}).get("auto_map")
            if auto_map:
                problems.append(
                    f"model.path: {path}/{name} loads code shipped with the model ({sorted(auto_map)[0]}); "
                    f"set model.trust_remote_code=true only if you trust it"
                )
    return problems


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def local_context_length(path: str) -> int | None:
    """The longest sequence a local model was built for (its config.json), or None if it does not say."""
    config = _read_json(Path(path) / "config.json") or {}
    for section in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(section.get(key), int):
                return section[key]
    return None


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, cache_dir: Path, fingerprint: str | None = None) -> Any:
    """Byte-level BPE trained on `texts`, cached by `fingerprint` (default: a digest of the texts, which
    must then be a sequence) and the vocab size. A streamed corpus (corpus.TrainingCorpus) brings its
    fingerprint, so a cached tokenizer is found without reading its texts."""
    from transformers import PreTrainedTokenizerFast

    if fingerprint is None:
        digests = hashlib.sha256()
        for t in texts:
            digests.update(hashlib.sha256(t.encode()).digest())
        fingerprint = digests.hexdigest()
    h = hashlib.sha256(f"bpe-v2:{vocab_size}:{fingerprint}".encode())
    directory = cache_dir / "tokenizers" / h.hexdigest()[:20]
    if (directory / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(directory))

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts) if isinstance(texts, Sized) else None)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1])
    tmp = directory.with_name(directory.name + ".tmp")
    wrapped.save_pretrained(str(tmp))
    directory.parent.mkdir(parents=True, exist_ok=True)
    if not directory.exists():
        tmp.rename(directory)
    logger.info("trained a %d-token BPE tokenizer -> %s", len(wrapped), directory)
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def load_local_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    problems = local_dir_problems(path, trust_remote_code)
    if problems:
        raise ModelError("; ".join(problems))
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, use_fast=True)
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"model.path: {path} has no fast tokenizer (tokenizer.json); kbtune needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


class TokenizerProvider:
    """The DataPreparation's tokenizer factory for a spec; records where the tokenizer lives."""

    def __init__(self, spec: ModelSpec, cache_dir: str | Path):
        self.spec = spec
        self.cache_dir = Path(cache_dir)
        self.tokenizer: Any = None

    @property
    def needs_corpus(self) -> bool:
        """A local model brings its tokenizer; kbtune's own is trained on the training texts."""
        return self.spec.source != "local"

    def __call__(self, train_texts: Iterable[str]) -> Any:
        if self.spec.source == "local":
            self.tokenizer = load_local_tokenizer(str(self.spec.path), self.spec.trust_remote_code)
        else:
            self.tokenizer = train_bpe_tokenizer(train_texts, self.spec.vocab_size, self.cache_dir,
                                                 getattr(train_texts, "fingerprint", None))
        return self.tokenizer

    def resolved_spec(self) -> ModelSpec:
        """The spec with its tokenizer's location and true vocabulary size filled in."""
        if self.tokenizer is None:
            raise RuntimeError("the tokenizer has not been built yet (prepare the data first)")
        if self.spec.source == "local":
            return replace(self.spec, tokenizer_dir=self.spec.path)
        return replace(self.spec, tokenizer_dir=self.tokenizer.name_or_path, vocab_size=len(self.tokenizer))


def build_model(spec: ModelSpec) -> Any:
    """Instantiate the transformers model a spec describes (weights random for scratch)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec.dtype)
    if spec.source == "local":
        problems = local_dir_problems(spec.path, spec.trust_remote_code)
        if problems:
            raise ModelError("; ".join(problems))
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, use_safetensors=True, trust_remote_code=spec.trust_remote_code, dtype=dtype
        )
        # from_pretrained returns eval mode and Lightning keeps the modes it finds: without this,
        # dropout (the model's and LoRA's) would stay off during training.
        model.train()
    else:
        # Seeded separately from the data order so the same spec always starts from the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(scratch_config(spec)).to(dtype)
    if spec.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns); 4.x only has the old one.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        model.config.use_cache = False
    return model


def scratch_config(spec: ModelSpec) -> Any:
    from transformers import GPT2Config, LlamaConfig

    # The BPE trainer gives special tokens the first ids, in SPECIAL_TOKENS order.
    eos, pad = 0, 1
    if spec.architecture == "gpt2":
        return GPT2Config(
            vocab_size=spec.vocab_size, n_positions=spec.max_position, n_embd=spec.n_embd, n_layer=spec.n_layer,
            n_head=spec.n_head, n_inner=spec.intermediate_size, resid_pdrop=spec.dropout, embd_pdrop=spec.dropout,
            attn_pdrop=spec.dropout, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.n_embd, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head, num_key_value_heads=spec.n_head,
        max_position_embeddings=spec.max_position, attention_dropout=spec.dropout, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
