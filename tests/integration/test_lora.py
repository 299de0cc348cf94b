"""LoRA fine-tuning of local checkpoints end to end: `model=local model.path=DIR finetune=lora` trains,
saves a version (adapter or merged), and the version loads to the same logits either way."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from kbtune.configuration import ConfigError, load
from kbtune.hydra_entry import compose, to_container
from kbtune.jobs import train
from kbtune.model_manager import SPEC_FILE, ModelManager, load_model_dir, save_model_dir
from kbtune.modeling.factory import ModelSpec
from kbtune.modeling.lora import export_for_saving
from kbtune.project import Project
from kbtune.records import SessionStatus
from tests.conftest import seed_kb
from tests.integration.local_checkpoints import make_local_checkpoint, write_ticket_corpus

PROBE = "The on-call engineer checks the ingestion backlog before paging the storage team."


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("local-models")
    return {arch: make_local_checkpoint(root / arch, arch) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> dict[str, Path]:
    """The same architectures without the pretraining, for tests that only read their structure."""
    root = tmp_path_factory.mktemp("untrained-models")
    return {arch: make_local_checkpoint(root / arch, arch, pretrain_steps=0) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def tickets_kb(tmp_path_factory) -> Path:
    """200 short, regular documents: three short epochs visibly lower the validation loss."""
    root = tmp_path_factory.mktemp("tickets")
    seed_kb(root / "chroma", "tickets", folder=write_ticket_corpus(root / "docs"))
    return root / "chroma"


def lora_overrides(project: dict, kb_path: Path, model_dir: Path, *extra: str) -> list[str]:
    kept = [o for o in project["overrides"] if not o.startswith(("model=", "kb.", "trainer.max_epochs"))]
    return [
        *kept, f"kb.path={kb_path}", "kb.collection=tickets", "model=local",
        f"model.path={model_dir}", "finetune=lora", "optim.learning_rate=1e-2", "optim.warmup_steps=5",
        "trainer.max_epochs=3", *extra,
    ]  # fmt: skip


def trained(overrides: list[str]):
    """Train through the composition root; return the store, the manager and the one session."""
    cfg = compose(overrides)
    assert train(cfg) is not None
    _, runtime = load(to_container(cfg))
    store = Project({}, runtime).store
    sessions = store.list_sessions()
    assert len(sessions) == 1 and sessions[0].status is SessionStatus.COMPLETED
    return store, ModelManager(store, runtime.cache_dir), sessions[0], runtime


def assert_val_loss_falls(store, session_id: str) -> None:
    history = [value for _, value in store.metric_history(session_id, "val/loss")]
    assert len(history) == 3 and history[0] > history[1] > history[2], history


def logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer(PROBE).input_ids])
    with torch.inference_mode():
        return model.eval()(input_ids=ids).logits


@pytest.mark.slow
def test_llama_lora_adapter_version_loads_like_its_merged_weights(project, checkpoints, tickets_kb, tmp_path):
    store, manager, session, runtime = trained(lora_overrides(project, tickets_kb, checkpoints["llama"]))
    assert_val_loss_falls(store, session.id)

    mv, directory = manager.model_dir("latest")
    assert mv.training_session_id == session.id
    files = {p.name for p in directory.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", SPEC_FILE} <= files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files)
    spec = ModelSpec.from_dict(json.loads((directory / SPEC_FILE).read_text()))
    assert spec.path == str(checkpoints["llama"]) and spec.lora is not None

    model, tokenizer = manager.load_model("latest")
    assert type(model).__name__.startswith("PeftModel")
    trained_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained_b and all(p.abs().sum() > 0 for p in trained_b)  # B starts at zero: it trained

    merged_dir = save_model_dir(
        export_for_saving(copy.deepcopy(model), merge=True), tokenizer, spec.to_dict(), tmp_path / "merged"
    )
    merged, _ = load_model_dir(merged_dir)
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged, tokenizer), logits(model, tokenizer), atol=1e-4, rtol=1e-4)

    # Only the adapters train: the module built from the saved spec has nothing else trainable.
    from kbtune.modeling.module import CausalLMModule

    module = CausalLMModule(spec.to_dict())
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    # Evaluation rebuilds the base (the local checkpoint) to report the gain of the adapter.
    service = Project({}, runtime).service
    results = service.evaluate_model("latest")
    assert results["eval/perplexity"] < results["eval/start_perplexity"]


@pytest.mark.slow
def test_gpt2_lora_merged_version_matches_the_trained_adapter(project, checkpoints, tickets_kb):
    # bf16 autocast, gradient checkpointing and accumulation together, as a memory-bound run would use.
    overrides = lora_overrides(
        project, tickets_kb, checkpoints["gpt2"], "save_merged=true", "trainer.precision=bf16-mixed",
        "model.gradient_checkpointing=true", "trainer.accumulate_grad_batches=2",
    )  # fmt: skip
    store, manager, session, runtime = trained(overrides)
    assert_val_loss_falls(store, session.id)

    mv, directory = manager.model_dir("latest")
    files = {p.name for p in directory.iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    merged, tokenizer = manager.load_model("latest")
    assert type(merged).__name__ == "GPT2LMHeadModel"
    assert merged.config.use_cache  # gradient checkpointing turned it off for training only

    from kbtune.modeling.module import CausalLMModule

    last = runtime.sessions_dir / session.id / "checkpoints" / "last.ckpt"
    module = CausalLMModule.load_from_checkpoint(str(last), map_location="cpu", weights_only=True)
    blocks = json.loads(store.read_text(session.id, "data/manifest.json"))["splits"]["train"]["blocks"]
    steps = 3 * math.ceil(math.ceil(blocks / 8) / 2)  # an optimizer step every 2 batches
    assert int(torch.load(last, map_location="cpu", weights_only=True)["global_step"]) == steps
    assert type(module.model).__name__.startswith("PeftModel")  # GPT-2 Conv1D layers carry adapters
    torch.testing.assert_close(
        logits(merged, tokenizer), logits(module.model, tokenizer), atol=1e-4, rtol=1e-4
    )


def test_lora_targets_are_detected_per_architecture_and_checked_when_overridden(
    project, untrained, tickets_kb
):
    from transformers import AutoModelForCausalLM, OPTConfig

    from kbtune.modeling.factory import build_model
    from kbtune.modeling.lora import resolve_targets

    llama = build_model(ModelSpec(source="local", path=str(untrained["llama"])))
    gpt2 = build_model(ModelSpec(source="local", path=str(untrained["gpt2"])))
    assert resolve_targets(llama) == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert resolve_targets(gpt2) == ("c_attn", "c_proj", "c_fc")
    # An architecture without an entry: every Linear layer but the LM head.
    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                     ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16))  # fmt: skip
    assert set(resolve_targets(opt)) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}

    kept = lora_overrides(project, tickets_kb, untrained["gpt2"])
    ok, _ = load(to_container(compose([*kept, "model.lora.target_modules=[c_attn]", "model.lora.r=4"])))
    assert ok.model.lora.target_modules == ("c_attn",) and ok.model.lora.r == 4
    with pytest.raises(ConfigError) as err:
        load(to_container(compose([*kept, "model.lora.target_modules=[q_proj,c_attn]"])))
    assert "model.lora.target_modules" in str(err.value) and "q_proj" in str(err.value)


@pytest.mark.slow
def test_lora_with_the_knowledge_recipe_raises_recall_of_trained_facts(project, checkpoints, tmp_path):
    """`model=local finetune=lora experiment=knowledge` on invented facts: the adapter makes the base
    state facts it could not before (closed-book exact match), and held-out facts stay unknown."""
    from kbtune.knowledge.facts import plant_facts
    from kbtune.knowledge_base import KBSettings, KnowledgeBase
    from tests.conftest import hash_embedder

    kb = KnowledgeBase.connect(KBSettings(path=str(tmp_path / "facts"), collection="facts"))
    plant_facts(kb, 12, embed=hash_embedder)
    kept = [
        o
        for o in project["overrides"]
        if not o.startswith(("model=", "kb.", "trainer.max_epochs", "data.", "eval."))
    ]
    overrides = [*kept, f"kb.path={tmp_path / 'facts'}", "kb.collection=facts", "model=local",
                 f"model.path={checkpoints['llama']}", "finetune=lora", "experiment=knowledge",
                 # A 64-wide, 2-layer base learns slowly through rank-16 adapters: a high rate, many views.
                 "model.lora.r=16", "model.lora.dropout=0", "optim.learning_rate=1e-2", "optim.warmup_steps=5",
                 "trainer.max_epochs=60", "data.val_fraction=0.2", "data.block_size=128", "eval.after_training=true"]  # fmt: skip
    store, manager, session, _ = trained(overrides)
    (version,) = store.list_versions()
    m = version.metrics
    assert m["knowledge/probes_trained"] >= 30
    assert m["knowledge/start/recall_trained"] == 0.0
    assert m["knowledge/recall_trained"] >= 0.05, m
    assert m["knowledge/mc_accuracy_trained"] > m["knowledge/start/mc_accuracy_trained"]
    assert m["knowledge/recall_heldout"] <= m["knowledge/start/recall_heldout"] + 0.05
