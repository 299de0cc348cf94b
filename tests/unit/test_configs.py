"""Every shipped config file composes and validates; bad values are gathered into one error."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbtune.configuration import ConfigError, load, plan_from
from kbtune.hydra_entry import CONF_DIR, compose, to_container

CONF = CONF_DIR
# Options that need arguments a bare compose does not have, with the overrides that complete them.
NEEDS = {("model", "local"): ["model.path={tmp}"], ("experiment", "update"): ["base_version=v1"]}
# Group options that only compose on top of another selection.
SKIP_VALIDATE = {("trainer", "fsdp"), ("trainer", "ddp")}


def group_options() -> list[tuple[str, str]]:
    out = []
    for group_dir in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"):
        for f in sorted(group_dir.glob("*.yaml")):
            out.append((group_dir.name, f.stem))
    return out


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_config_file_composes(group, option, tmp_path):
    overrides = [f"paths.root={tmp_path}", f"{group}={option}"]
    overrides += [o.format(tmp=tmp_path) for o in NEEDS.get((group, option), [])]
    cfg = compose(overrides)
    data = to_container(cfg)
    assert data["paths"]["root"] == str(tmp_path.resolve())
    if (group, option) in NEEDS or (group, option) in SKIP_VALIDATE or group == "hparams_search":
        return
    plan, runtime = load(to_container(cfg))
    assert plan.config["model"]["name"] and runtime.tracking.uri


def test_top_level_configs_compose(tmp_path):
    for name in ("train", "evaluate"):
        cfg = compose([f"paths.root={tmp_path}"], config_name=name)
        assert cfg.paths.root == str(tmp_path)


def test_defaults_resolve_to_absolute_paths_under_root(tmp_path):
    plan, runtime = load(to_container(compose([f"paths.root={tmp_path}"])))
    assert runtime.tracking.uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert runtime.kb.path == f"{tmp_path.resolve()}/data/chroma"
    assert runtime.sessions_dir == tmp_path.resolve() / "sessions"
    assert plan.model.name == "small" and plan.trainer.max_epochs == 3


def test_every_problem_is_reported_at_once_naming_its_key(tmp_path):
    cfg = compose(
        [f"paths.root={tmp_path}", "trainer.max_epochs=-2", "data.val_fraction=1.5", "data.batch_size=0",
         "optim.learning_rate=-1", "model.n_embd=100", "model.n_head=3", "kb.collection=ab", "version=../x"]
    )  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load(to_container(cfg))
    keys = {p.split(":")[0] for p in err.value.problems}
    assert {"trainer.max_epochs", "data.val_fraction", "data.batch_size", "optim.learning_rate", "model.n_embd",
            "kb.collection", "version"} <= keys  # fmt: skip


def test_wrong_types_are_reported(tmp_path):
    cfg = compose([f"paths.root={tmp_path}", "trainer.max_epochs=three", "data.block_size=1.5"])
    with pytest.raises(ConfigError) as err:
        load(to_container(cfg))
    assert "trainer.max_epochs: input should be a valid integer, got 'three'" in err.value.problems
    assert "data.block_size: input should be a valid integer, got 1.5" in err.value.problems


def test_non_finite_numbers_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"optim.learning_rate: input should be a finite number"):
        load(to_container(compose([f"paths.root={tmp_path}", "optim.learning_rate=inf"])))


def test_unknown_override_key_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="trainer.max_epoch"):
        compose([f"paths.root={tmp_path}", "trainer.max_epoch=3"])


def test_a_moved_key_points_to_its_new_name(tmp_path):
    with pytest.raises(ConfigError, match=r"model.learning_rate is now optim.learning_rate"):
        compose([f"paths.root={tmp_path}", "model.learning_rate=1e-3"])


def test_optimizer_is_its_own_node_and_each_model_picks_its_variant(tmp_path):
    root = f"paths.root={tmp_path}"
    assert load(to_container(compose([root])))[0].optim.learning_rate == 1e-3
    assert load(to_container(compose([root, "model=tiny"])))[0].optim.learning_rate == 3e-3
    assert load(to_container(compose([root, "model=tiny", "finetune=lora"])))[0].optim.learning_rate == 2e-4
    # The command line wins over the model's choice.
    assert load(to_container(compose([root, "model=tiny", "optim.learning_rate=0.5"])))[0].optim.learning_rate == 0.5


def test_local_model_needs_a_loadable_directory(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    for overrides, message in (
        (["model=local"], "model.path: required"),
        (["model=local", f"model.path={tmp_path / 'missing'}"], "is not a directory"),
        (["model=local", f"model.path={empty}"], "no config.json"),
    ):
        with pytest.raises(ConfigError, match=message):
            load(to_container(compose([f"paths.root={tmp_path}", *overrides])))


def test_configs_are_airtight(tmp_path):
    """Each YAML's keys are read by a settings class: an unused key fails validation."""
    cfg = compose([f"paths.root={tmp_path}"])
    for section in ("data", "trainer", "callbacks", "optim", "model"):
        data = to_container(cfg)
        data[section]["not_a_key"] = 1
        problems: list[str] = []
        plan_from(data, problems)
        assert any(p.startswith(f"{section}.not_a_key: unknown key") for p in problems)


def test_each_yaml_starts_with_a_comment():
    for f in Path(CONF).rglob("*.yaml"):
        first = f.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{f} should open with a comment saying what it is for"


def test_an_update_without_its_base_version_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="base_version: required"):
        load(to_container(compose([f"paths.root={tmp_path}", "experiment=update"])))


def test_check_val_every_n_epoch_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="trainer.check_val_every_n_epoch: must be >= 1"):
        load(to_container(compose([f"paths.root={tmp_path}", "trainer.check_val_every_n_epoch=0"])))


def test_bf16_true_is_refused_for_full_fine_tuning(tmp_path):
    # No fp32 master copy: updates below bf16's resolution would be lost.
    with pytest.raises(ConfigError, match="trainer.precision: bf16-true .* use bf16-mixed"):
        load(to_container(compose([f"paths.root={tmp_path}", "trainer.precision=bf16-true"])))
