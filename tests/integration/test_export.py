"""Exporting model versions: GGUF files that transformers' own GGUF loader reads back to the same
logits and token ids (f32, f16, q8_0; tied and untied heads; a merged LoRA version), plain
safetensors directories, the refusal of non-Llama models, the model card and the Ollama Modelfile."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch

from kbtune.export import (
    ExportError,
    export_gguf,
    export_safetensors,
    sha256_of,
    write_model_card,
    write_modelfile,
)
from kbtune.generation import GenerationSettings
from kbtune.model_manager import SPEC_FILE, save_model_dir
from tests.integration.local_checkpoints import CHATML, SAMPLE_KB, make_local_checkpoint

CONTEXT = 128
PROBES = [
    "The on-call engineer checks the ingestion backlog before paging the storage team.",
    "Gannet Bay: the Heron H2 buoy reported a clock step.",
    "<|im_start|>user\nWhat changed?<|im_end|>\n<|im_start|>assistant\n",
]
# Max |logit difference| allowed after the round trip. Measured on this model (logits up to ~3.5,
# std 0.8): f32 0 (bit-exact), f16 3.5e-3, q8_0 0.084 max / 0.015 mean (one 8-bit scale per block
# of 32 weights; 0.12 max for the untied head). The q8_0 bound leaves 2-3x room.
TOLERANCE = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.25}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from kbtune.modeling.factory import train_bpe_tokenizer

    texts = [p.read_text() for p in sorted(SAMPLE_KB.rglob("*.md"))]
    tok = train_bpe_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def tiny_llama(tokenizer, tied: bool = True):
    """GQA (4 query heads, 2 key/value heads) and a non-default RoPE base, so both reach the file."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, rope_theta=50000.0,
        tie_word_embeddings=tied, initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Version directories as kbtune saves them, with the models they hold."""
    root = tmp_path_factory.mktemp("versions")
    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        model = tiny_llama(tokenizer, tied)
        out[name] = (
            save_model_dir(model, tokenizer, {"name": "tiny", "source": "scratch"}, root / name),
            model,
        )
    return out


def logits(model, tokenizer) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([tokenizer(p).input_ids])).logits[0] for p in PROBES]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def gguf_fields(path: Path) -> tuple[dict, dict]:
    """(scalar metadata, tensor name -> ggml type name) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {
        k: f.contents()
        for k, f in reader.fields.items()
        if not k.startswith("tokenizer.ggml.") or k.endswith("_id")
    }
    meta["tokenizer.ggml.model"] = reader.get_field("tokenizer.ggml.model").contents()
    return meta, {t.name: t.tensor_type.name for t in reader.tensors}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_through_transformers(versions, tokenizer, tmp_path, dtype):
    directory, model = versions["tied"]
    path = export_gguf(directory, tmp_path / f"tiny-{dtype}.gguf", dtype)
    assert path.exists() and not list(tmp_path.glob("*.part"))
    loaded, loaded_tok = load_gguf(path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.num_key_value_heads == 2
    diff = max_diff(logits(loaded, tokenizer), logits(model, tokenizer))
    assert diff <= TOLERANCE[dtype], f"{dtype}: max |logit diff| {diff:.2e}"
    sample = sorted((SAMPLE_KB / "part_a").rglob("*.md"))[0].read_text()[:2000]
    for text in [*PROBES, sample]:
        assert loaded_tok(text).input_ids == tokenizer(text).input_ids

    meta, tensors = gguf_fields(path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.context_length"] == CONTEXT and meta["llama.rope.freq_base"] == 50000.0
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert meta["tokenizer.chat_template"] == CHATML
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["output_norm.weight"] == tensors["blk.0.attn_norm.weight"] == "F32"
    assert tensors["blk.1.attn_k.weight"] == {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]


def test_untied_head_is_written_and_round_trips(versions, tokenizer, tmp_path):
    directory, model = versions["untied"]
    path = export_gguf(directory, tmp_path / "untied.gguf")
    assert "output.weight" in gguf_fields(path)[1]
    loaded, _ = load_gguf(path)
    assert not loaded.config.tie_word_embeddings
    assert max_diff(logits(loaded, tokenizer), logits(model, tokenizer)) <= 1e-4


def test_llama3_style_pre_tokenizer_is_named_so_llama_cpp_splits_the_same(tmp_path):
    import gguf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = (  # Llama 3's pre-tokenizer regex, as in its tokenizer.json
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([p.read_text() for p in sorted(SAMPLE_KB.rglob("*.md"))], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    directory = save_model_dir(tiny_llama(tokenizer), tokenizer, {"name": "llama3-tok"}, tmp_path / "v")
    path = export_gguf(directory, tmp_path / "out" / "m.gguf")
    assert gguf.GGUFReader(str(path)).get_field("tokenizer.ggml.pre").contents() == "llama-bpe"
    _, loaded = load_gguf(path)
    for text in [*PROBES, "They'll pay 1234567 in 2026,  twice\n\n\tover"]:
        assert loaded(text).input_ids == tokenizer(text).input_ids


def test_lora_version_exports_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    from kbtune.modeling.factory import LoraSpec, ModelSpec, build_model, load_local_tokenizer
    from kbtune.modeling.lora import apply_lora, export_for_saving

    base_dir = make_local_checkpoint(tmp_path / "base", "llama", context=CONTEXT, pretrain_steps=0)
    spec = ModelSpec(source="local", path=str(base_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    tok = load_local_tokenizer(str(base_dir))
    peft_model = apply_lora(build_model(ModelSpec(source="local", path=str(base_dir))), spec.lora)
    torch.manual_seed(2)
    with torch.no_grad():  # B starts at zero: give the adapter an effect to merge
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    peft_model.eval()
    expected = logits(peft_model, tok)
    with peft_model.disable_adapter():
        assert max_diff(logits(peft_model, tok), expected) > 1e-2
    version = save_model_dir(
        export_for_saving(peft_model, merge=False), tok, spec.to_dict(), tmp_path / "version"
    )
    assert (version / "adapter_config.json").exists()

    out = export_safetensors(version, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", SPEC_FILE}
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert max_diff(logits(plain, tok), expected) <= 1e-4

    loaded, _ = load_gguf(export_gguf(version, tmp_path / "gguf" / "lora.gguf"))
    assert max_diff(logits(loaded, tok), expected) <= 1e-4


def test_non_llama_models_are_refused_for_gguf(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    directory = save_model_dir(
        AutoModelForCausalLM.from_config(config), tokenizer, {"name": "gpt2"}, tmp_path / "v"
    )
    with pytest.raises(ExportError, match="GPT2LMHeadModel") as err:
        export_gguf(directory, tmp_path / "gpt2.gguf")
    assert isinstance(err.value, ValueError) and "LlamaForCausalLM" in str(err.value)
    assert not (tmp_path / "gpt2.gguf").exists()
    assert (export_safetensors(directory, tmp_path / "hf") / "model.safetensors").exists()
    with pytest.raises(ExportError, match="q4"):
        export_gguf(directory, tmp_path / "x.gguf", dtype="q4")


def test_model_card_lists_what_is_known_and_marks_the_rest(tmp_path):
    info = {
        "version": "support-v2", "version_id": "m-7", "session_id": "s-42", "base_model": "acme/tiny-llama",
        "collection": "tickets", "documents": 200, "format": "gguf", "dtype": "q8_0",
        "config": {"model": {"name": "local", "lora": {"r": 8}}, "trainer": {"max_epochs": 3}, "seed": 42},
        "metrics": {"val/loss": 1.2345678, "knowledge/recall@5": 0.8},
    }  # fmt: skip
    (tmp_path / "tiny.gguf").write_bytes(b"")
    text = write_model_card(tmp_path, info).read_text()
    front, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    assert "library_name: gguf" in front and 'base_model: "acme/tiny-llama"' in front and "- kbtune" in front
    for section in (
        "## Base model",
        "## Training data",
        "## Training settings",
        "## Metrics",
        "## How to load",
    ):
        assert section in body
    assert "Manifest digest: unknown" in body and "Documents: 200" in body and "Collection: tickets" in body
    assert "| `model.lora.r` | 8 |" in body and "| `trainer.max_epochs` | 3 |" in body
    assert "| `data.block_size` | unknown |" in body
    assert "| `knowledge/recall@5` | 0.8 |" in body and "| `val/loss` | 1.23457 |" in body
    assert 'gguf_file="tiny.gguf"' in body and "ollama create" in body

    local = write_model_card(
        tmp_path / "hf", {"base_model": str(tmp_path), "format": "safetensors"}
    ).read_text()
    assert "base_model:" not in local.split("---\n")[1] and "library_name: transformers" in local
    assert "# unknown" in local and "| unknown | unknown |" in local


def test_modelfile_follows_the_tokenizer(versions, tokenizer, tmp_path):
    gguf_path = export_gguf(versions["tied"][0], tmp_path / "tiny.gguf", "f16")
    text = write_modelfile(tmp_path, "tiny.gguf", tokenizer).read_text()
    assert text.startswith("FROM ./tiny.gguf\n")
    assert "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text and "<|im_start|>assistant\n" in text
    for line in ('PARAMETER stop "<|endoftext|>"', 'PARAMETER stop "<|im_end|>"', "PARAMETER temperature 0.7",
                 f"PARAMETER num_ctx {CONTEXT}"):  # fmt: skip
        assert line in text.splitlines()

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    settings = GenerationSettings(max_new_tokens=64, temperature=0.2, top_p=0.9, seed=5)
    text = write_modelfile(tmp_path / "p", "tiny", plain, settings, context_length=64).read_text()
    assert "FROM ./tiny.gguf" in text and "User: {{ .Content }}" in text and 'PARAMETER stop "User:"' in text
    for line in ("PARAMETER temperature 0.2", "PARAMETER top_p 0.9", "PARAMETER num_predict 64", "PARAMETER seed 5",
                 "PARAMETER num_ctx 64"):  # fmt: skip
        assert line in text.splitlines()

    plain.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    text = write_modelfile(tmp_path / "u", "tiny.gguf", plain).read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "\n# " in text
    assert "# num_ctx left to Ollama's default" in text  # no file to read the length from: not guessed

    assert sha256_of(gguf_path) == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
