"""The benchmark command at toy size: it runs every section and writes the JSON the README's table comes
from. Benchmarks are not tests: no speed is asserted here. What is asserted is that the figures are
sane and cannot flatter: every ratio is the ratio of two printed medians, every target's verdict is its
value against its threshold, every README line states the verdict of the targets it names, and the
README's table is what its results JSON generates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402
import readme_table  # noqa: E402

SECTIONS = {
    "training", "profile", "mfu", "data", "data_scale", "startup", "e2e", "knowledge", "recipe", "update", "generation",
}  # fmt: skip
# The sections that write README lines from their own figures.
README_SECTIONS = {"data", "data_scale", "startup", "e2e", "generation", "knowledge"}


# -- the sanity every results JSON must have (quick or full) --------------------------------------------
def baseline_row(rows: list[dict], row: dict) -> dict:
    """The printed row a ratio divides by: in the same section, named by `baseline` (its variant or its
    metric) and, where the row records it, with the median it used; the same comparison and metric
    first."""
    found = [r for r in rows if row["baseline"] in (r["variant"], r["metric"])]  # a baseline's own 1.00x too
    if row.get("baseline_median") is not None:
        found = [r for r in found if r["median"] == pytest.approx(row["baseline_median"], rel=1e-12)]
    for key in ("comparison", "metric"):
        narrowed = [r for r in found if r[key] == row[key]]
        found = narrowed or found
    assert found, f"the ratio of {row} divides by {row['baseline']!r}, which no row of its section shows"
    return found[0]


def combined(mets: list) -> bool | None:
    return False if False in mets else (None if None in mets or not mets else True)


def check_sanity(report: dict) -> None:
    quick = report["meta"].get("quick")
    for name, section in report["sections"].items():
        rows = section.get("rows", [])
        for row in rows:
            if row.get("ratio") is not None:
                base = baseline_row(rows, row)
                assert row["ratio"] == pytest.approx(row["median"] / base["median"], rel=1e-9), (row, base)
            if row["metric"] == "MFU":
                assert 0 < row["median"] <= 100 and row["min"] > 0 and row["max"] <= 100, row
        targets = {t["name"]: t for t in section.get("targets", [])}
        for t in targets.values():
            if t["value"] is None:
                assert t["met"] is None, t
                continue
            assert t["met"] in (True, False), t
            expected = t["value"] >= t["threshold"] if t["op"] == ">=" else t["value"] <= t["threshold"]
            assert t["op"] in (">=", "<=") and t["met"] == expected, t
        for line in section.get("readme", []):
            assert all(isinstance(line[k], str) for k in ("comparison", "result", "target")), line
            assert line.get("met") in (True, False, None), line
            if line.get("targets"):
                named = [targets[n] for n in line["targets"]]  # every named target exists in the section
                assert line.get("met") == combined([t["met"] for t in named]), (line, named)
        for extra in section.get("readme_tables", []):
            assert all(len(r) == len(extra["header"]) for r in extra["rows"]), extra
        same = [r for r in rows if "val/loss" in r["comparison"] and "identical" in r["comparison"]]
        says_quick = section.get("quick") or (section.get("details") or {}).get("quick")
        if len(same) > 1 and not (quick and says_quick):
            losses = [r["median"] for r in same]
            assert max(losses) <= min(losses) * 1.01, (name, same)


# -- the quick run ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "latest.json"
    cmd = [
        sys.executable,
        str(BENCHMARKS / "run.py"),
        "--quick",
        "--out",
        str(out),
        "--workdir",
        str(tmp / "work"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout, out


@pytest.mark.slow
def test_every_section_is_measured(quick_report):
    report, _, _ = quick_report
    assert set(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert "error" not in section, section.get("error")
        assert section["rows"], name
        for row in section["rows"]:
            # Times and losses are positive; a recall or accuracy may be 0 at toy size.
            positive = not any(word in row["metric"] for word in ("recall", "accuracy", "changed fact"))
            assert (row["median"] > 0 or not positive) and row["min"] <= row["median"] <= row["max"], row
    for name in README_SECTIONS:
        assert report["sections"][name]["readme"], name
    meta = report["meta"]
    assert meta["quick"] is True and "loadavg" in meta["load_before"] and "quiet" in meta["load_after"]
    assert isinstance(meta["machine"]["flags"], list) and meta["machine"]["slug"]


@pytest.mark.slow
def test_ratios_targets_and_readme_lines_are_consistent(quick_report):
    check_sanity(quick_report[0])


@pytest.mark.slow
def test_training_compares_all_variants_on_the_same_steps(quick_report):
    report, _, _ = quick_report
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
    # (training.py no longer records `parameters` in its details since ce981eb; checked where it does.)
    assert details["peak_gflops"]["fp32"] > 0
    assert details["flops_per_token"] > 6 * details.get("parameters", 0)
    assert all(r["median"] > 0 for r in training["rows"] if r["metric"] == "val/loss")


@pytest.mark.slow
def test_measured_training_runs_leave_no_checkpoints_or_models_behind(quick_report):
    """Every kbtune run the benchmarks time writes checkpoints and a model (2.2 GB at ~100M parameters);
    over a hundred runs kept them all and filled the disk. The session records stay."""
    report, _, _ = quick_report
    root = Path(report["meta"]["workdir"]) / "training"
    sessions = list((root / "sessions").iterdir())
    assert len(sessions) >= 2, sessions  # kbtune ran, in bf16 and fp32 at least
    assert not list(root.rglob("*.ckpt"))
    assert not list((root / "mlruns").rglob("*.safetensors"))


@pytest.mark.slow
def test_data_startup_and_e2e_report_their_targets(quick_report):
    report, stdout, _ = quick_report
    names = " ".join(t["name"] for s in report["sections"].values() for t in s["targets"])
    for expected in ("raw limit", "cached rerun", "peak RSS", "kbtune --help", "first optimizer step", "MFU"):
        assert expected in names, expected
    data = report["sections"]["data"]
    assert data["details"]["tokens"] > 0 and data["details"]["kbtune_tokens"] == data["details"]["tokens"]
    # The cached rerun is the real data stage, and it hit the cache the first run wrote.
    assert all(s["cached"] == 1 for s in data["samples"]["kbtune_cached"])
    assert data["details"]["first_run"]["cached"] == 0
    for name in data["details"]["rss"]:
        assert all(s["rss_mb"] > 0 and s["array_bytes"] > 0 for s in data["details"]["rss"][name])
    scale = report["sections"]["data_scale"]
    assert scale["details"]["documents"] == 5000 and "1 round" in scale["details"]["rounds"]
    assert {t["name"].split(",")[0] for t in scale["targets"]} == {
        "data preparation speed", "peak RSS - imports / token array bytes", "cached rerun / fresh preparation",
    }  # fmt: skip
    # The rerun on the store as kbtune left it reads no document; after another program's Chroma
    # client opened the store, it reads them all, and both find the cache.
    unchanged, after_other = scale["samples"]["kbtune_cached"], scale["samples"]["kbtune_cached_after_other"]
    assert all(s["cached"] == 1 and s["documents_read"] == 0 for s in unchanged)
    assert all(s["cached"] == 1 and s["documents_read"] == 5000 for s in after_other)
    startup = {r["variant"] for r in report["sections"]["startup"]["rows"]}
    assert {"first_step_warm", "first_step_cold", "tokenizer_train", "tokenizer_load"} <= startup
    e2e = report["sections"]["e2e"]["summaries"]["default"]
    assert e2e["val_loss"]["median"] > 0 and e2e["seconds"]["median"] > 0
    # The printed table carries every section and the targets.
    assert "targets:" in stdout and all(f"\n{name} " in stdout for name in SECTIONS)


@pytest.mark.slow
def test_knowledge_reports_the_evaluation_against_the_training(quick_report):
    report, _, _ = quick_report
    rows = {(r["variant"], r["metric"]): r for r in report["sections"]["knowledge"]["rows"]}
    evaluation = rows[("evaluation", "wall")]
    assert evaluation["baseline"] == "training" and evaluation["ratio"] > 0
    assert evaluation["ratio"] == pytest.approx(evaluation["median"] / rows[("training", "wall")]["median"])
    assert rows[("batched (16)", "scoring")]["baseline"] == "one at a time"


@pytest.mark.slow
def test_generation_compares_streaming_with_transformers_and_times_the_first_token(quick_report):
    report, _, _ = quick_report
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
    report, _, _ = quick_report
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
    report, _, _ = quick_report
    rows = {(r["variant"], r["metric"]): r for r in report["sections"]["update"]["rows"]}
    update = rows[("update", "wall")]
    assert update["baseline"] == "full retrain" and update["ratio"] == pytest.approx(
        update["median"] / rows[("full retrain", "wall")]["median"]
    )
    assert ("base (start)", "recall unchanged") in rows and ("update", "recall delta") in rows
    targets = {t["name"]: t for t in report["sections"]["update"]["targets"]}
    assert targets["update wall / full retrain wall"]["value"] == pytest.approx(update["ratio"])


def readme_table_cmd(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCHMARKS / "readme_table.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.slow
def test_the_readme_table_is_generated_from_the_results(quick_report, tmp_path):
    report, _, out = quick_report
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    assert readme_table_cmd(str(out), "--readme", str(readme)).returncode == 0
    first = readme.read_text()
    assert readme_table_cmd(str(out), "--readme", str(readme)).returncode == 0
    assert readme.read_text() == first  # idempotent
    assert readme_table_cmd(str(out), "--check", "--readme", str(readme)).returncode == 0
    block = first[first.index(readme_table.BEGIN) : first.index(readme_table.END)]
    lines = [line for s in report["sections"].values() for line in s.get("readme", [])]
    assert lines and all(readme_table.cell(line["comparison"]) in block for line in lines)
    # Outside the markers nothing changed.
    original = (REPO / "README.md").read_text()
    assert first[: first.index(readme_table.BEGIN)] == original[: original.index(readme_table.BEGIN)]
    # A figure edited by hand is caught.
    begin = first.index(readme_table.BEGIN)
    edited = first[:begin] + first[begin:].replace(" | **", " | **9", 1)
    assert edited != first
    readme.write_text(edited)
    check = readme_table_cmd(str(out), "--check", "--readme", str(readme))
    assert check.returncode == 1 and "+++" in check.stdout and "**9" in check.stdout


# -- fast: the pieces, without running a benchmark -------------------------------------------------------
def test_interleave_rotates_the_order_every_round():
    calls: list[str] = []
    variants = {n: (lambda n=n: calls.append(n) or {"x": 1.0}) for n in "abc"}
    samples = harness.interleave(variants, 4, "test")
    assert calls == list("abcbcacabab" + "c")
    assert {n: len(s) for n, s in samples.items()} == {"a": 4, "b": 4, "c": 4}


def test_pairs_run_back_to_back_alternating_which_goes_first_and_their_ratio_is_taken_per_round():
    calls: list[str] = []
    speed = iter([10.0, 8.0, 12.0, 6.0, 4.0, 5.0, 9.0, 9.0])

    def variant(name: str):
        return lambda: calls.append(name) or {"tok": next(speed)}

    pairs = {"p": {"k": variant("pk"), "b": variant("pb")}, "q": {"k": variant("qk"), "b": variant("qb")}}
    samples = harness.interleave_pairs(pairs, 2, "test")
    # Round 1: p then q, p's kbtune first, q's baseline first; round 2 rotates to q first and flips both.
    assert calls == ["pk", "pb", "qb", "qk", "qk", "qb", "pb", "pk"]
    assert [s["tok"] for s in samples["p k"]] == [10.0, 9.0] and [s["tok"] for s in samples["p b"]] == [8.0, 9.0]
    paired = harness.paired_ratio(samples, "p k", "p b", "tok")
    assert paired["values"] == [1.25, 1.0] and paired["median"] == 1.125
    # A ratio of medians would not pair the runs: q's is (6+4)/2 / (12+5)/2, its paired one (0.5 + 0.8)/2.
    assert harness.paired_ratio(samples, "q k", "q b", "tok")["median"] == pytest.approx(0.65)
    if harness._cpu_times():  # Linux: a sample says how much CPU the hypervisor took meanwhile
        import time

        slow = harness.interleave_pairs({"p": {"k": lambda: time.sleep(0.05) or {}, "b": lambda: {}}}, 1)
        assert 0 <= slow["p k"][0]["steal_percent"] <= 100
    with pytest.raises(ValueError, match="exactly two"):
        harness.interleave_pairs({"p": {"k": variant("k")}}, 1)


def test_the_machine_is_named_for_file_names():
    assert (
        harness.machine_slug("Intel(R) Xeon(R) Processor", 2, ["avx512f", "amx_bf16"]) == "intel-xeon-2c-amx"
    )
    assert harness.machine_slug("AMD EPYC 7B13 64-Core Processor", 2, ["avx2"]) == "amd-epyc-2c"
    machine = harness.machine()
    assert set(machine["flags"]) <= set(harness.MATMUL_FLAGS) and machine["slug"].replace("-", "").isalnum()


def synthetic_report(quick: bool = False, started: str = "2026-12-03T10:00:00+00:00") -> dict:
    passed = harness.target("speed (x base)", 1.2, ">=", 1.0)
    missed = harness.target("memory (x arrays)", 3.0, "<=", 2.0)
    return {
        "meta": {"quick": quick, "started": started, "load_before": {"quiet": True}, "load_after": {"quiet": False,
                 "other_cpu_percent": 50}, "machine": {"cpu": "Test CPU", "cores": 2, "flags": ["avx2"]}},
        "sections": {
            "one": {"rows": [], "targets": [passed, missed], "readme": [
                harness.readme_row("speed | of it", "**1.20x**", ">= 1x", [passed]),
                harness.readme_row("memory", "**3.00x**", "<= 2x", [missed]),
                harness.readme_row("no target", "12 s"),
            ], "readme_tables": [{"title": "Extra", "header": ["a", "b"], "rows": [["1", "2"]], "note": "a note"}]},
            "two": {"error": "Traceback ...", "rows": [], "targets": []},
        },
    }  # fmt: skip


def test_the_table_states_each_target_verdict(tmp_path):
    report = synthetic_report()
    check_sanity(report)
    block = readme_table.render(report, tmp_path / "r.json")
    assert "| speed \\| of it | **1.20x** | >= 1x **met** |" in block
    assert "| memory | **3.00x** | <= 2x **not met** |" in block and "| no target | 12 s |  |" in block
    assert "**Extra**" in block and "| 1 | 2 |" in block and "a note" in block
    assert "Test CPU, 2 cores (avx2)" in block and "quiet before, NOT quiet (50% CPU" in block
    assert "failed in this run" in block and "two" in block
    # A line whose verdict disagrees with its target is caught.
    report["sections"]["one"]["readme"][1]["met"] = True
    with pytest.raises(AssertionError):
        check_sanity(report)


def test_the_default_results_are_the_newest_full_run(tmp_path):
    for name, report in {
        "old.json": synthetic_report(started="2026-12-01T10:00:00+00:00"),
        "new.json": synthetic_report(started="2026-12-02T10:00:00+00:00"),
        "quick.json": synthetic_report(quick=True, started="2026-12-09T10:00:00+00:00"),
        "no-readme.json": {"meta": {"quick": False, "started": "2026-12-09T10:00:00+00:00"}, "sections": {}},
    }.items():
        (tmp_path / name).write_text(json.dumps(report))
    assert readme_table.newest_results(tmp_path).name == "new.json"


def test_a_write_without_files_puts_the_newest_run_on_top_of_the_named_ones_of_its_machine(tmp_path):
    older, newer = synthetic_report(started="2026-12-01T10:00:00+00:00"), synthetic_report()
    (tmp_path / "old.json").write_text(json.dumps(older))
    (tmp_path / "new.json").write_text(json.dumps(newer))
    named = [tmp_path / "old.json"]
    assert readme_table.default_runs(named, tmp_path) == [tmp_path / "old.json", tmp_path / "new.json"]
    assert readme_table.default_runs([tmp_path / "new.json"], tmp_path) == [tmp_path / "new.json"]
    assert readme_table.default_runs([], tmp_path) == [tmp_path / "new.json"]
    newer["meta"]["machine"] = {"cpu": "Other CPU", "cores": 2}
    (tmp_path / "new.json").write_text(json.dumps(newer))
    assert readme_table.default_runs(named, tmp_path) == [tmp_path / "new.json"]


def test_committed_results_are_sane():
    """Every results JSON in benchmarks/results, as committed."""
    for path in sorted((BENCHMARKS / "results").glob("*.json")):
        report = readme_table.load(path)
        if report is not None:
            check_sanity(report)


def test_the_readme_table_matches_the_results_it_names():
    readme = (REPO / "README.md").read_text()
    start, end = readme_table.current_block(readme)
    sources = readme_table.named_sources(readme[start:end])
    if not sources:
        pytest.skip("the README holds no generated table yet")
    for source in sources:
        assert source.exists() and source.parent == BENCHMARKS / "results", f"{source} is not a committed results file"
    check = readme_table_cmd("--check")
    assert check.returncode == 0, f"run benchmarks/readme_table.py {' '.join(map(str, sources))}:\n{check.stdout}"


def test_a_table_from_several_runs_takes_each_section_from_the_latest_and_names_every_run(tmp_path):
    older, newer = synthetic_report(started="2026-12-01T10:00:00+00:00"), synthetic_report()
    newer["sections"] = {"one": {**newer["sections"]["one"], "readme": [harness.readme_row("speed | of it", "**2.00x**")]}}
    block = readme_table.render([(older, tmp_path / "old.json"), (newer, tmp_path / "new.json")])
    assert "**2.00x**" in block and "**1.20x**" not in block and "| memory |" not in block
    assert "old.json` (sections: two)" in block and "new.json` (sections: one)" in block
    assert f"from {tmp_path / 'old.json'}, {tmp_path / 'new.json'}:" in block
    assert readme_table.named_sources(block) == [tmp_path / "old.json", tmp_path / "new.json"]
    other = synthetic_report()
    other["meta"]["machine"] = {"cpu": "Other CPU", "cores": 2}
    with pytest.raises(readme_table.TableError, match="different machines"):
        readme_table.render([(older, tmp_path / "old.json"), (other, tmp_path / "other.json")])
