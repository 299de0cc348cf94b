"""Model and tokenizer factory: `scratch` models built from a transformers config with a BPE tokenizer
trained on the training split, or `local` Hugging Face directories loaded from disk (safetensors only)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")


class ModelError(ValueError):
    """A model directory or spec that cannot be used."""


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Empty: detected from the architecture (attention and MLP projections).
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the model; saved in checkpoints as plain values."""

    name: str = "small"
    source: Literal["scratch", "local"] = "scratch"
    architecture: Literal["llama", "gpt2"] = "llama"
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
            p.extend(local_dir_problems(self.path))
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.lora is not None:
            if self.lora.r < 1:
                p.append(f"model.lora.r: must be >= 1, got {self.lora.r}")
            if not 0.0 <= self.lora.dropout < 1.0:
                p.append(f"model.lora.dropout: must be in [0, 1), got {self.lora.dropout}")
        return p

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


def local_dir_problems(path: str | None) -> list[str]:
    """Why a local model directory cannot be loaded (safetensors weights and a tokenizer are required)."""
    if not path:
        return ["model.path: required for model=local (a local Hugging Face model directory)"]
    d = Path(path)
    if not d.is_dir():
        return [f"model.path: {path} is not a directory"]
    problems = []
    if not (d / "config.json").exists():
        problems.append(f"model.path: {path} has no config.json")
    if not any(d.glob("*.safetensors")):
        hint = " (only pickle .bin weights found; convert them to safetensors)" if any(d.glob("*.bin")) else ""
        problems.append(f"model.path: {path} has no *.safetensors weights{hint}")
    if not any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        problems.append(f"model.path: {path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return problems


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, cache_dir: Path) -> Any:
    """Byte-level BPE trained on `texts`, cached by a fingerprint of the texts and the vocab size."""
    from transformers import PreTrainedTokenizerFast

    h = hashlib.sha256(f"bpe-v1:{vocab_size}".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
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
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1])
    tmp = directory.with_name(directory.name + ".tmp")
    wrapped.save_pretrained(str(tmp))
    directory.parent.mkdir(parents=True, exist_ok=True)
    if not directory.exists():
        tmp.rename(directory)
    logger.info("trained a %d-token BPE tokenizer on %d documents -> %s", len(wrapped), len(texts), directory)
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def load_local_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    problems = local_dir_problems(path)
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

    def __call__(self, train_texts: Sequence[str]) -> Any:
        if self.spec.source == "local":
            self.tokenizer = load_local_tokenizer(str(self.spec.path), self.spec.trust_remote_code)
        else:
            self.tokenizer = train_bpe_tokenizer(train_texts, self.spec.vocab_size, self.cache_dir)
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

    if spec.source == "local":
        problems = local_dir_problems(spec.path)
        if problems:
            raise ModelError("; ".join(problems))
        model = AutoModelForCausalLM.from_pretrained(
            spec.path, use_safetensors=True, trust_remote_code=spec.trust_remote_code, dtype=torch.float32
        )
    else:
        # Seeded separately from the data order so the same spec always starts from the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(scratch_config(spec))
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
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
