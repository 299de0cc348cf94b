"""What stops a run before anything is written when a local model, its precision or its scale-out
settings cannot work: one ConfigError naming every key to change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kbtune.configuration import ConfigError, load
from kbtune.hydra_entry import compose, to_container
from kbtune.jobs import train
from kbtune.model_manager import load_model_dir, save_model_dir
from kbtune.modeling.factory import ModelError, ModelSpec, build_model, load_local_tokenizer
from kbtune.modeling.lora import LoraSpec, apply_lora, export_for_saving
from kbtune.training_loop import cuda_available
from tests.integration.local_checkpoints import make_local_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_local_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", context=128, pretrain_steps=0)


def problems(project: dict, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(to_container(compose([*project["overrides"], *overrides])))
    return str(err.value)


def test_a_directory_without_weights_or_tokenizer_is_refused_with_the_reason(project, llama_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = problems(project, "model=local", f"model.path={empty}")
    assert "has no config.json" in text and "no *.safetensors weights" in text and "no tokenizer" in text

    pickled = tmp_path / "pickled"
    shutil.copytree(llama_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    text = problems(project, "model=local", f"model.path={pickled}")
    assert "only pickle weights found: pytorch_model.bin" in text and "convert them to safetensors" in text

    assert "is not a directory" in problems(project, "model=local", f"model.path={tmp_path / 'missing'}")


def test_remote_code_runs_only_when_allowed(project, llama_dir, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(llama_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    text = problems(project, "model=local", f"model.path={custom}")
    assert "loads code shipped with the model" in text and "model.trust_remote_code=true" in text
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_local_tokenizer(str(custom))
    plan, _ = load(to_container(compose([*project["overrides"], "model=local", f"model.path={custom}", "model.trust_remote_code=true"])))
    assert plan.model.trust_remote_code


def test_sequence_length_must_fit_the_models_context(project, llama_dir):
    text = problems(project, "model=local", f"model.path={llama_dir}", "data.block_size=256")
    assert "data.block_size: 256 exceeds the 128-token context" in text
    plan, _ = load(to_container(compose([*project["overrides"], "model=local", f"model.path={llama_dir}", "data.block_size=128"])))
    assert plan.data.block_size == 128


def test_half_precision_weights_only_for_a_frozen_lora_base(project, llama_dir):
    local = ["model=local", f"model.path={llama_dir}", "model.dtype=bfloat16"]
    assert "model.dtype: bfloat16 is for a frozen base under LoRA" in problems(project, *local)
    plan, _ = load(to_container(compose([*project["overrides"], *local, "finetune=lora"])))
    assert plan.model.dtype == "bfloat16" and plan.model.lora is not None
    model = apply_lora(build_model(plan.model), plan.model.lora)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(str(d) == "torch.float32" for n, d in dtypes.items() if "lora_" in n)
    assert all(str(d) == "torch.bfloat16" for n, d in dtypes.items() if "lora_" not in n)


@pytest.mark.skipif(cuda_available(), reason="checks the CPU-only refusal")
def test_gpu_only_settings_are_refused_on_cpu(project):
    assert "16-mixed needs a CUDA GPU" in problems(project, "trainer.precision=16-mixed")
    text = problems(project, "trainer=fsdp")
    assert "trainer.strategy: fsdp" in text and "unknown key" not in text


def test_scale_out_configs_compose(project):
    plan, _ = load(to_container(compose([*project["overrides"], "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])))
    assert (plan.trainer.strategy, plan.trainer.devices, plan.trainer.max_epochs) == ("ddp", 2, 2)
    _, runtime = load(to_container(compose([*project["overrides"], "tracking=server", "tracking.uri=http://10.0.0.5:5000"])))
    assert runtime.tracking.uri == "http://10.0.0.5:5000" and runtime.tracking.artifact_location is None
    # Launching more processes re-runs the script, which a compose-API caller is not.
    with pytest.raises(ConfigError, match="scripts/train.py"):
        train(compose([*project["overrides"], "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]))


def test_an_adapter_version_names_its_base_and_refuses_to_load_without_it(llama_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    spec = ModelSpec(name="local", source="local", path=str(base), lora=LoraSpec(r=4, alpha=8))
    model = apply_lora(build_model(spec), spec.lora)
    saved = save_model_dir(export_for_saving(model, merge=False), load_local_tokenizer(str(base)), spec.to_dict(), tmp_path / "v")
    loaded, _ = load_model_dir(saved)
    assert type(loaded).__name__.startswith("PeftModel")

    shutil.rmtree(base)
    with pytest.raises(ModelError, match=f"needs its base model {base}"):
        load_model_dir(saved)
    (saved / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="safetensors only"):
        load_model_dir(saved)
