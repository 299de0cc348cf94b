"""Tiny Hugging Face checkpoints written with `save_pretrained`, standing in for a user's local model
(a Llama- or GPT-2-architecture model with a BPE tokenizer trained on the sample corpus beside it),
and a knowledge base regular enough that a few LoRA steps on such a model visibly lower its loss."""

from __future__ import annotations

from pathlib import Path

SAMPLE_KB = Path(__file__).resolve().parents[2] / "data" / "sample_kb"

# A minimal ChatML-style template, like the ones Qwen and others ship in tokenizer_config.json.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_local_checkpoint(
    directory: Path,
    architecture: str = "llama",
    context: int = 128,
    chat_template: str | None = None,
    pretrain_steps: int = 40,
) -> Path:
    """A checkpoint that has already learned some language (a short pretraining on part_b of the
    sample corpus), so fine-tuning it on part_a behaves like fine-tuning a real base model."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from kbtune.modeling.factory import train_bpe_tokenizer

    texts = [p.read_text() for p in sorted(SAMPLE_KB.rglob("*.md"))]
    tokenizer = train_bpe_tokenizer(texts, 512, directory.parent / f"{directory.name}-tokenizer")
    if chat_template:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = chat_template
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if architecture == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=context, n_embd=64, n_layer=2, n_head=2, **ids)
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=context, tie_word_embeddings=True, **ids,
        )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    pretrain(model, tokenizer, [p.read_text() for p in sorted((SAMPLE_KB / "part_b").rglob("*.md"))], pretrain_steps)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def write_ticket_corpus(folder: Path, files: int = 4, tickets_per_file: int = 50) -> Path:
    """Markdown files of short support tickets, one `## Ticket` section (= one document) each."""
    import random

    rng = random.Random(0)
    devices = ["Heron H2 buoy", "Kestrel K5 station", "Fernline F30 probe", "Estuary gateway"]
    sites = ["Gannet Bay", "Caddon River", "Averley", "Sellick Valley"]
    faults = ["a clock step", "a stalled OTA", "a flat battery", "a silent uplink"]
    for f in range(files):
        sections = []
        for t in range(tickets_per_file):
            n = f * tickets_per_file + t
            sections.append(
                f"## Ticket {n}\n\nThe {rng.choice(devices)} at {rng.choice(sites)} reported {rng.choice(faults)}. "
                "The on-call engineer followed the runbook and closed the ticket."
            )
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"tickets-{f}.md").write_text(f"# Tickets {f}\n\n" + "\n\n".join(sections) + "\n")
    return folder


def pretrain(model, tokenizer, texts: list[str], steps: int, block: int = 64, batch: int = 8) -> None:
    import torch

    ids = torch.tensor([t for text in texts for t in tokenizer(text).input_ids + [tokenizer.eos_token_id]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block, (batch,), generator=g)
        x = torch.stack([ids[s : s + block] for s in starts])
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
