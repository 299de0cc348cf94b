"""The benchmark command at toy size: it runs every section and writes the JSON the README's table
comes from. Benchmarks are not tests: no speed is asserted here, only that the figures exist."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SECTIONS = {"training", "data", "startup", "e2e", "knowledge", "recipe", "update", "generation"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "latest.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "run.py"),
        "--quick",
        "--out",
        str(out),
        "--workdir",
        str(tmp / "work"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_every_section_is_measured(quick_report):
    report, _ = quick_report
    assert set(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert "error" not in section, section.get("error")
        assert section["rows"], name
        for row in section["rows"]:
            # Times and losses are positive; a recall or accuracy may be 0 at toy size.
            positive = not any(word in row["metric"] for word in ("recall", "accuracy", "changed fact"))
            assert (row["median"] > 0 or not positive) and row["min"] <= row["median"] <= row["max"], row
    assert report["meta"]["quick"] is True and "loadavg" in report["meta"]["load_before"]


@pytest.mark.slow
def test_training_compares_all_variants_on_the_same_steps(quick_report):
    report, _ = quick_report
    training = report["sections"]["training"]
    identical = {
        r["variant"]: r
        for r in training["rows"]
        if r["metric"] == "throughput" and r["comparison"].startswith("identical")
    }
    assert set(identical) == {"kbtune", "plain", "hf_trainer"}
    defaults = {
        r["variant"]: r
        for r in training["rows"]
        if r["metric"] == "throughput" and r["comparison"] == "defaults"
    }
    assert set(defaults) == {"kbtune", "hf_defaults"} and defaults["kbtune"]["baseline"] == "hf_defaults"
    # Every variant ran the same number of interleaved rounds, and ratios are medians over the baseline's.
    rounds = {name: len(samples) for name, samples in training["samples"].items()}
    assert len(set(rounds.values())) == 1, rounds
    plain = training["summaries"]["plain"]["tokens_per_s"]["median"]
    assert identical["kbtune"]["ratio"] == pytest.approx(identical["kbtune"]["median"] / plain)
    details = training["details"]
    assert details["peak_gflops"]["fp32"] > 0 and details["flops_per_token"] > 6 * details["parameters"]
    assert all(r["median"] > 0 for r in training["rows"] if r["metric"] == "val/loss")


@pytest.mark.slow
def test_data_startup_and_e2e_report_their_targets(quick_report):
    report, stdout = quick_report
    names = " ".join(t["name"] for s in report["sections"].values() for t in s["targets"])
    for expected in ("raw limit", "cached rerun", "peak RSS", "kbtune --help", "first optimizer step", "MFU"):
        assert expected in names, expected
    data = report["sections"]["data"]["details"]
    assert data["tokens"] > 0 and data["kbtune_tokens"] > 0
    e2e = report["sections"]["e2e"]["summaries"]["default"]
    assert e2e["val_loss"]["median"] > 0 and e2e["seconds"]["median"] > 0
    # The printed table carries every section and the targets.
    assert "targets:" in stdout and all(f"\n{name} " in stdout for name in SECTIONS)


@pytest.mark.slow
def test_knowledge_reports_the_evaluation_against_the_training(quick_report):
    report, _ = quick_report
    rows = {(r["variant"], r["metric"]): r for r in report["sections"]["knowledge"]["rows"]}
    evaluation = rows[("evaluation", "wall")]
    assert evaluation["baseline"] == "training" and evaluation["ratio"] > 0
    assert evaluation["ratio"] == pytest.approx(evaluation["median"] / rows[("training", "wall")]["median"])
    assert rows[("batched (16)", "scoring")]["baseline"] == "one at a time"


@pytest.mark.slow
def test_generation_compares_streaming_with_transformers_and_times_the_first_token(quick_report):
    report, _ = quick_report
    section = report["sections"]["generation"]
    rows = {(r["variant"], r["metric"]): r for r in section["rows"]}
    assert rows[("kbtune streamed", "throughput")]["baseline"] == "transformers generate"
    assert {("cold cache", "first token"), ("warm cache", "first token")} <= set(rows)
    (target,) = section["targets"]
    assert target["name"].startswith("generate tokens/s") and target["value"] > 0
    # Greedy decoding: kbtune's stream and transformers' generate wrote the same 128 tokens of text.
    assert section["details"]["same_text"] is True
    assert set(section["details"]["tokens"].values()) == {128}


@pytest.mark.slow
def test_recipe_compares_each_option_with_the_defaults_at_equal_exposures(quick_report):
    report, _ = quick_report
    section = report["sections"]["recipe"]
    rows = {(r["variant"], r["metric"]): r for r in section["rows"]}
    assert rows[("experiment=knowledge", "train")]["baseline"] == "defaults"
    assert rows[("experiment=knowledge", "wall")]["ratio"] == pytest.approx(
        rows[("experiment=knowledge", "wall")]["median"] / rows[("defaults", "wall")]["median"]
    )
    overrides = section["details"]["overrides"]
    # Equal exposures: 2 epochs x 5 views against 10 epochs validated every 5.
    assert "data.views_per_epoch=5" in overrides["experiment=knowledge"]
    assert "trainer.check_val_every_n_epoch=5" in overrides["defaults"]
    names = {t["name"] for t in section["targets"]}
    assert "experiment=knowledge recall of trained facts" in names


@pytest.mark.slow
def test_update_compares_with_a_full_retrain(quick_report):
    report, _ = quick_report
    rows = {(r["variant"], r["metric"]): r for r in report["sections"]["update"]["rows"]}
    update = rows[("update", "wall")]
    assert update["baseline"] == "full retrain" and update["ratio"] == pytest.approx(
        update["median"] / rows[("full retrain", "wall")]["median"]
    )
    assert ("base (start)", "recall unchanged") in rows and ("update", "recall delta") in rows
    targets = {t["name"]: t for t in report["sections"]["update"]["targets"]}
    assert targets["update wall / full retrain wall"]["value"] == pytest.approx(update["ratio"])
