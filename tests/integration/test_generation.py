"""Trying a model: streamed greedy text equals `generate`, seeded sampling repeats, long prompts keep
their tail, chat sessions (template and plain transcript) stop at the turn's end and trim their
history to the context, and the model cache evicts by bytes."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from kbtune.generation import (
    ChatSession,
    GenerationSettings,
    ModelCache,
    generate_text,
    model_bytes,
    stream_generate,
)
from tests.integration.local_checkpoints import CHATML, SAMPLE_KB, pretrain

CONTEXT = 128
# One exchange, in both chat formats: a model trained on them answers "pong" and then starts the
# next turn, which is where a reply must stop.
PLAIN_EXCHANGE = "User: ping\nAssistant: pong\n"
CHATML_EXCHANGE = "<|im_start|>user\nping<|im_end|>\n<|im_start|>assistant\npong<|im_end|>\n"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny GQA Llama with a ChatML-capable BPE tokenizer, briefly trained on the two exchanges."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kbtune.modeling.factory import train_bpe_tokenizer

    texts = [p.read_text() for p in sorted(SAMPLE_KB.rglob("*.md"))]
    tokenizer = train_bpe_tokenizer(texts, 512, tmp_path_factory.mktemp("tok"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    pretrain(model, tokenizer, [PLAIN_EXCHANGE * 4, CHATML_EXCHANGE * 3] * 20, steps=60)
    return model.eval(), tokenizer


@pytest.fixture
def plain_tokenizer(chat_model):
    tokenizer = copy.deepcopy(chat_model[1])
    tokenizer.chat_template = None
    return tokenizer


def reference(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_settings_validation_names_each_bad_field():
    assert GenerationSettings().validate() == []
    problems = GenerationSettings(max_new_tokens=0, temperature=float("nan"), top_p=0.0, seed=-1).validate()
    assert [p.split(":")[0] for p in problems] == ["max_new_tokens", "temperature", "top_p", "seed"]
    assert (
        GenerationSettings(max_new_tokens=4096, temperature=5.5, top_p=1.5)
        .validate()[0]
        .startswith("max_new_tokens")
    )
    with pytest.raises(ValueError, match="temperature"):
        list(stream_generate(None, None, "x", GenerationSettings(temperature=-1.0)))


@pytest.mark.parametrize("prompt", ["The on-call engineer", "User: ping\nAssistant:", "Gannet Bay"])
def test_greedy_stream_equals_generate_and_repeats(chat_model, prompt):
    model, tokenizer = chat_model
    settings = GenerationSettings(max_new_tokens=24)
    pieces = list(stream_generate(model, tokenizer, prompt, settings))
    assert len(pieces) > 1  # streamed, not one block at the end
    expected = reference(model, tokenizer, tokenizer(prompt).input_ids, 24)
    assert "".join(pieces) == expected
    assert generate_text(model, tokenizer, prompt, settings) == expected


def test_untrained_model_stream_matches_generate_with_partial_characters(chat_model):
    """Random weights emit arbitrary byte tokens, half UTF-8 characters among them."""
    model, tokenizer = chat_model
    random_model = type(model)(model.config).eval()
    ids = tokenizer("Héron météo").input_ids
    expected = reference(random_model, tokenizer, ids, 40)
    assert (
        generate_text(random_model, tokenizer, "Héron météo", GenerationSettings(max_new_tokens=40))
        == expected
    )


def test_seeded_sampling_repeats_and_seeds_differ(chat_model):
    model, tokenizer = chat_model

    def sample(seed: int) -> str:
        settings = GenerationSettings(max_new_tokens=20, temperature=1.5, top_p=0.95, seed=seed)
        return generate_text(model, tokenizer, "The", settings)

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(5)}) > 1


def test_long_prompt_keeps_its_tail(chat_model):
    model, tokenizer = chat_model
    prompt = " ".join(p.read_text() for p in sorted(SAMPLE_KB.rglob("*.md"))[:3])
    ids = tokenizer(prompt).input_ids
    assert len(ids) > 2 * CONTEXT
    text = generate_text(model, tokenizer, prompt, GenerationSettings(max_new_tokens=8))
    assert text == reference(model, tokenizer, ids[-(CONTEXT - 8) :], 8)


def test_chat_template_session_stops_at_turn_end(chat_model):
    model, tokenizer = chat_model
    chat = ChatSession(model, tokenizer, GenerationSettings(max_new_tokens=12))
    assert chat.uses_template
    assert "".join(chat.send("ping")) == "pong"
    assert "".join(chat.send("ping")) == "pong"
    assert chat.last_prompt == CHATML_EXCHANGE + "<|im_start|>user\nping<|im_end|>\n<|im_start|>assistant\n"
    assert chat.history == [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}] * 2


def test_plain_session_stops_before_the_next_user_turn(chat_model, plain_tokenizer):
    model, _ = chat_model
    chat = ChatSession(model, plain_tokenizer, GenerationSettings(max_new_tokens=12))
    assert not chat.uses_template
    assert "".join(chat.send("ping")) == "pong"
    assert "".join(chat.send("ping")) == "pong"
    assert chat.last_prompt == PLAIN_EXCHANGE + "User: ping\nAssistant:"


@pytest.mark.parametrize("template", [True, False])
def test_session_drops_oldest_turns_to_fit_the_context(chat_model, plain_tokenizer, template):
    model, tokenizer = chat_model
    tokenizer = tokenizer if template else plain_tokenizer
    settings = GenerationSettings(max_new_tokens=16)
    chat = ChatSession(model, tokenizer, settings)
    for i in range(12):
        reply = "".join(chat.send(f"message {i} about the Kestrel station"))
        assert len(tokenizer(chat.last_prompt, add_special_tokens=False).input_ids) <= CONTEXT - 16
    assert len(chat.history) == 24 and reply == chat.history[-1]["content"]
    assert "message 0 " not in chat.last_prompt and "message 11 " in chat.last_prompt
    assert "message 10 " in chat.last_prompt  # only as many turns as needed were dropped


def test_reading_part_of_a_reply_keeps_that_part(chat_model, plain_tokenizer):
    model, _ = chat_model
    chat = ChatSession(model, plain_tokenizer, GenerationSettings(max_new_tokens=12))
    stream = chat.send("ping")
    first = next(stream)
    stream.close()
    assert chat.history[-1] == {"role": "assistant", "content": first}


def linear(n: int) -> torch.nn.Module:
    return torch.nn.Linear(n, n, bias=False)  # n*n float32 parameters


def test_model_cache_evicts_least_recent_by_bytes():
    sizes = {"a": 16, "b": 16, "c": 24}
    loads: list[str] = []

    def loader(key):
        def load():
            loads.append(key)
            return linear(sizes[key]), f"tok-{key}"

        return load

    assert model_bytes(linear(16)) == 16 * 16 * 4
    cache = ModelCache(max_bytes=2 * 16 * 16 * 4 + 100)
    cache.get("a", loader("a"))
    cache.get("b", loader("b"))
    assert cache.get("a", loader("a"))[1] == "tok-a" and loads == ["a", "b"]  # a hit, now most recent
    cache.get("c", loader("c"))  # 24*24*4 bytes: b (least recent) and then a must go
    assert cache.keys() == ["c"] and cache.total_bytes == 24 * 24 * 4
    cache.get("b", loader("b"))
    assert cache.keys() == ["b"]  # c alone plus b is over budget: the newest stays
    small = ModelCache(max_bytes=10)
    small.get("c", loader("c"))
    assert small.keys() == ["c"]  # larger than the budget, but the most recent one always stays


def test_model_cache_loads_a_key_once_under_concurrency():
    cache = ModelCache(max_bytes=1 << 20)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return linear(4), "tok"

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("v1", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(m) for m, _ in results}) == 1
