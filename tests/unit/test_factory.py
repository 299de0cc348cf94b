"""The model and tokenizer factory: seeded scratch models of the spec's sizes, spec validation and
round trips, the cached BPE tokenizer, and the checks on local model directories."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kbtune.modeling.factory import (
    SPECIAL_TOKENS,
    LoraSpec,
    ModelError,
    ModelSpec,
    build_model,
    local_context_length,
    local_dir_problems,
    train_bpe_tokenizer,
)

TINY = ModelSpec(name="tiny", n_layer=2, n_head=2, n_embd=64, intermediate_size=128, vocab_size=300,
                 max_position=64, init_seed=7)  # fmt: skip
TEXTS = [
    "The estuary gateway forwards sensor readings to the cloud every minute.",
    "Calibration of the pressure sensor uses a traceable reference at three points.",
    "Firmware updates are signed and verified by the bootloader before install.",
] * 5


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_scratch_model_is_determined_by_its_init_seed():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(TINY)
    # Seeding the weights leaves the caller's random stream (data order, dropout) where it was.
    assert torch.equal(torch.rand(3), expected_draw)
    assert same_weights(first, build_model(TINY))
    assert not same_weights(first, build_model(replace(TINY, init_seed=8)))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_scratch_model_has_the_spec_sizes(architecture):
    spec = replace(TINY, architecture=architecture)
    model = build_model(spec)
    config = model.config
    assert config.model_type == architecture and model.training
    assert model.get_input_embeddings().weight.shape == (300, 64)
    assert model.get_output_embeddings().weight.shape == (300, 64)
    assert config.num_hidden_layers == 2 and config.num_attention_heads == 2 and config.hidden_size == 64
    # The special tokens the BPE trainer gives the first ids: eos/bos 0, pad 1.
    assert (config.eos_token_id, config.bos_token_id, config.pad_token_id) == (0, 0, 1)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out = model(input_ids=torch.randint(0, 300, (2, 64))).logits
    assert out.shape == (2, 64, 300) and torch.isfinite(out).all()
    if architecture == "llama":
        assert config.intermediate_size == 128 and config.max_position_embeddings == 64
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    else:
        assert config.n_inner == 128 and config.n_positions == 64


def test_validate_names_every_bad_value_with_its_key():
    assert TINY.validate() == []
    bad = replace(TINY, architecture="bert", n_layer=0, n_head=3, vocab_size=10, dropout=1.0, dtype="bfloat16",
                  max_position=0)  # fmt: skip
    problems = bad.validate()
    for key, value in [("model.architecture", "'bert'"), ("model.n_layer", "0"), ("model.n_embd", "model.n_head=3"),
                       ("model.vocab_size", "10"), ("model.dropout", "1.0"), ("model.dtype", "bfloat16"),
                       ("model.max_position", "0")]:  # fmt: skip
        assert any(p.startswith(f"{key}:") and value in p for p in problems), (key, problems)
    assert len(problems) == 7
    lora = replace(TINY, dtype="bfloat16", lora=LoraSpec(r=0, dropout=1.5))
    assert sorted(p.split(":")[0] for p in lora.validate()) == ["model.lora.dropout", "model.lora.r"]
    assert ModelSpec(source="local").validate() == [
        "model.path: required for model=local (a local Hugging Face model directory)"
    ]


def test_spec_refuses_wrong_types_and_unknown_keys_at_construction():
    with pytest.raises(ValueError, match="n_layer"):
        ModelSpec(n_layer="2")
    with pytest.raises(ValueError, match="n_layers"):
        ModelSpec.from_dict({**TINY.to_dict(), "n_layers": 2})


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"))])
def test_spec_round_trips_through_plain_values(lora):
    spec = replace(TINY, lora=lora, tokenizer_dir="/cache/tok")
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain values only: it travels in checkpoints
    assert ModelSpec.from_dict(json.loads(json.dumps(data))) == spec
    if lora is not None:
        assert data["lora"]["target_modules"] == ["q_proj", "v_proj"]


def test_bpe_tokenizer_has_the_special_tokens_and_is_cached(tmp_path):
    tokenizer = train_bpe_tokenizer(TEXTS, 300, tmp_path)
    eos, pad = SPECIAL_TOKENS
    assert (tokenizer.eos_token, tokenizer.pad_token) == (eos, pad)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)  # what scratch_config expects
    assert len(tokenizer) <= 300
    ids = tokenizer(TEXTS[0]).input_ids
    assert tokenizer.decode(ids) == TEXTS[0] and max(ids) < len(tokenizer)

    cached = sorted((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in cached[0].iterdir()}
    again = train_bpe_tokenizer(TEXTS, 300, tmp_path)
    # Not retrained: the same directory, no file rewritten, nothing added beside it.
    assert again.name_or_path == tokenizer.name_or_path == str(cached[0])
    assert {p.name: p.stat().st_mtime_ns for p in cached[0].iterdir()} == stamps
    assert sorted((tmp_path / "tokenizers").iterdir()) == cached
    assert again(TEXTS[1]).input_ids == tokenizer(TEXTS[1]).input_ids

    # Another vocabulary size or other texts: another fingerprint.
    train_bpe_tokenizer(TEXTS, 280, tmp_path)
    train_bpe_tokenizer(TEXTS[:2], 300, tmp_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 3


@pytest.fixture
def local_dir(tmp_path) -> Path:
    """A loadable local model directory: a small llama's safetensors, config and fast tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path / "local-model"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=96)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(str(directory))
    train_bpe_tokenizer(TEXTS, 300, tmp_path / "cache").save_pretrained(str(directory))
    return directory


def test_a_complete_local_dir_loads_in_train_mode(local_dir):
    assert local_dir_problems(str(local_dir)) == []
    assert local_context_length(str(local_dir)) == 96
    model = build_model(ModelSpec(source="local", path=str(local_dir)))
    assert model.training  # from_pretrained gives eval mode; training needs dropout back on
    assert model.config.hidden_size == 32 and model.get_input_embeddings().weight.shape == (300, 32)


def test_local_dir_problems_name_what_is_missing(local_dir, tmp_path):
    missing = tmp_path / "nowhere"
    assert local_dir_problems(str(missing)) == [f"model.path: {missing} is not a directory"]

    for weights in local_dir.glob("*.safetensors"):
        weights.unlink()
    (local_dir / "pytorch_model.bin").write_bytes(b"pickle")
    problems = local_dir_problems(str(local_dir))
    assert len(problems) == 1 and "no *.safetensors weights" in problems[0]
    assert "pytorch_model.bin" in problems[0]  # named, as the one to convert, never loaded
    with pytest.raises(ModelError, match="safetensors"):
        build_model(ModelSpec(source="local", path=str(local_dir)))
    (local_dir / "tokenizer.json").unlink()
    assert any("has no tokenizer" in p for p in local_dir_problems(str(local_dir)))


def test_remote_code_needs_trust_remote_code(local_dir):
    config = json.loads((local_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (local_dir / "config.json").write_text(json.dumps(config))
    problems = local_dir_problems(str(local_dir))
    assert len(problems) == 1 and "config.json loads code shipped with the model" in problems[0]
    assert "model.trust_remote_code=true" in problems[0]
    assert local_dir_problems(str(local_dir), trust_remote_code=True) == []
    assert ModelSpec(source="local", path=str(local_dir)).validate() == problems
