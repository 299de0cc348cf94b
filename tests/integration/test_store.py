"""ModelManager over MlflowStore (real SQLite in a temp dir) and InMemoryStore alike: session lifecycle,
round-trip, versions, labels, concurrency, aliases; MLflow's limits and processes on MLflow alone. The
`check_*` functions take any store so test_store_server.py runs them against a real `mlflow server`."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from kbtune.model_manager import MODEL_ARTIFACT, MODEL_TAG, ModelManager, VersionLabelError, save_model_dir
from kbtune.records import ModelVersion, SessionStatus, TrainingSession
from kbtune.tracking.memory_store import InMemoryStore
from kbtune.tracking.store import NotFoundError, SessionStore

SRC = Path(__file__).resolve().parents[2] / "src" / "kbtune"
TEXTS = [
    "The estuary gateway forwards sensor readings to the cloud every minute.",
    "Calibration of the pressure sensor uses a traceable reference at three points.",
    "Firmware updates are signed and verified by the bootloader before install.",
] * 10


# -- helpers (shared with test_store_server.py) ---------------------------------------------------
def make_store(tmp: Path, **kwargs: Any):
    from kbtune.tracking.mlflow_store import MlflowStore

    return MlflowStore(f"sqlite:///{tmp}/mlflow.db", artifact_location=str(tmp / "artifacts"), **kwargs)


def tiny_model_dir(directory: Path, seed: int, cache: Path) -> Path:
    """A real save_pretrained directory of a 1-layer model whose weights depend on `seed`."""
    from kbtune.modeling.factory import ModelSpec, build_model, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(TEXTS, 300, cache)
    spec = ModelSpec(name="tiny", n_layer=1, n_head=2, n_embd=16, intermediate_size=32,
                     vocab_size=len(tokenizer), max_position=64, init_seed=seed)  # fmt: skip
    return save_model_dir(build_model(spec), tokenizer, spec.to_dict(), directory)


def file_digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()
    }


def completed_session(
    store, tmp: Path, seed: int, metrics: dict[str, float] | None = None
) -> tuple[TrainingSession, dict[str, str]]:
    """A completed session holding a model artifact, recorded through the store exactly as
    TrainingService._save_final_model records one. Returns the session and its model's file digests."""
    session = store.create_session({"model": {"name": "tiny", "init_seed": seed}, "seed": seed})
    store.update_session(session.id, status=SessionStatus.RUNNING)
    if metrics:
        store.log_metrics(session.id, metrics, step=1)
    staging = tiny_model_dir(tmp / "staging" / f"{session.id}", seed, tmp / "cache")
    uri = store.log_artifacts(session.id, staging, MODEL_ARTIFACT)
    store.set_tags(session.id, {MODEL_TAG: uri})
    session = store.update_session(
        session.id, status=SessionStatus.COMPLETED, completed_at=datetime.now(timezone.utc)
    )
    return session, file_digests(staging)


def artifact_tree(root: Path) -> dict[str, str]:
    """Every file under a local artifact root with its digest (for 'nothing was written' checks)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def weights(model) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def race(n: int, work: Callable[[int], Any]) -> list[Any]:
    """`work(i)` for each i < n in n threads released at once: each one's result or exception."""
    barrier = threading.Barrier(n, timeout=120)

    def run(i: int) -> Any:
        barrier.wait()
        try:
            return work(i)
        except BaseException as exc:  # the caller asserts on it
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


# -- checks (any SessionStore) ---------------------------------------------------------------------
def check_session_lifecycle(store) -> None:
    ok = store.create_session({"run": "ok"})
    assert ok.status is SessionStatus.PENDING
    assert ok.started_at is not None and ok.started_at.tzinfo is not None
    assert ok.completed_at is None and ok.error is None

    running = store.update_session(ok.id, status=SessionStatus.RUNNING)
    assert running.status is SessionStatus.RUNNING and running.completed_at is None

    done_at = datetime.now(timezone.utc).replace(microsecond=0)
    done = store.update_session(ok.id, status=SessionStatus.COMPLETED, completed_at=done_at)
    assert done.status is SessionStatus.COMPLETED
    assert done.completed_at == done_at and done.completed_at.tzinfo is not None
    assert done.error is None
    assert store.get_session(ok.id) == done

    failed = store.create_session({"run": "failed"})
    store.update_session(failed.id, status=SessionStatus.RUNNING)
    error = "RuntimeError: boom in step 3\n\nTraceback (most recent call last):\n  ..."
    failed = store.update_session(
        failed.id, status=SessionStatus.FAILED, error=error, completed_at=datetime.now(timezone.utc)
    )
    assert failed.status is SessionStatus.FAILED and failed.error == error and failed.completed_at is not None
    assert store.get_session(failed.id).error == error

    with pytest.raises(NotFoundError):
        store.update_session("0" * 32, status=SessionStatus.FAILED)

    stopped = store.create_session({"run": "stopped"})
    store.update_session(stopped.id, status=SessionStatus.RUNNING)
    stopped = store.update_session(
        stopped.id, status=SessionStatus.STOPPED, completed_at=datetime.now(timezone.utc)
    )
    assert (
        stopped.status is SessionStatus.STOPPED and stopped.completed_at is not None and stopped.error is None
    )


def check_long_error_is_kept(store) -> None:
    session = store.create_session({})
    error = "ValueError: " + "x" * 20000 + " END"
    got = store.update_session(session.id, status=SessionStatus.FAILED, error=error)
    # Tags have a length limit; the head is on the record and the full text is an artifact.
    assert got.error.startswith("ValueError: xxx") and "truncated" in got.error
    assert store.read_text(session.id, "kbtune/error.txt") == error


def check_round_trip(store) -> None:
    config = {
        "model": {"name": "tiny", "n_layer": 2, "lora": None, "target_modules": ["q_proj", "v_proj"]},
        "data": {"block_size": 64, "val_fraction": 0.1, "template": "{title}\n\n{text}"},
        "trainer": {"max_epochs": 2, "precision": "auto", "enable_progress_bar": False},
        "long": "y" * 2000,  # params truncate at 500 characters; the config artifact must not
        "unicode": "Größe – 温度",
        "seed": 42,
    }
    created = store.create_session(config, run_name="round-trip", tags={"kbtune.test": "1"})
    assert created.config == config
    store.log_metrics(created.id, {"train/loss": 4.0, "val/loss": 4.5}, step=1)
    store.log_metrics(created.id, {"train/loss": 3.0, "val/loss": 3.5}, step=2)
    store.log_metrics(created.id, {"train/loss": 2.0}, step=3)
    got = store.get_session(created.id)
    assert isinstance(got, TrainingSession)
    assert got.id == created.id
    assert got.config == config
    assert got.metrics == {"train/loss": 2.0, "val/loss": 3.5}  # the latest value of each
    assert got.started_at == created.started_at
    assert abs(got.started_at - datetime.now(timezone.utc)) < timedelta(minutes=5)
    fields = ["id", "status", "config", "metrics", "started_at", "completed_at", "error"]
    assert [f.name for f in dataclasses.fields(got)] == fields
    assert json.loads(json.dumps(got.to_dict()))["config"] == config
    assert store.get_tags(created.id)["kbtune.test"] == "1"

    with pytest.raises(NotFoundError):
        store.get_session("0" * 32)


def check_list_sessions(store) -> None:
    created: list[tuple[str, SessionStatus]] = []
    for status in (
        SessionStatus.COMPLETED,
        SessionStatus.FAILED,
        SessionStatus.COMPLETED,
        SessionStatus.RUNNING,
    ):
        s = store.create_session({"status": status.value})
        store.update_session(s.id, status=status)
        created.append((s.id, status))
        time.sleep(0.02)  # distinct start times, so "newest first" is well defined
    newest_first = [i for i, _ in reversed(created)]
    all_sessions = store.list_sessions()
    assert [s.id for s in all_sessions if s.id in newest_first] == newest_first
    starts = [s.started_at for s in all_sessions]
    assert starts == sorted(starts, reverse=True)

    for status in (SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.RUNNING):
        listed = store.list_sessions(status)
        assert all(s.status is status for s in listed)
        expected = [i for i in newest_first if dict(created)[i] is status]
        assert [s.id for s in listed if s.id in newest_first] == expected
    assert [s.id for s in store.list_sessions(limit=2)] == [s.id for s in all_sessions[:2]]


def check_versions(store, tmp: Path) -> None:
    manager = ModelManager(store, tmp / "cache")
    s1, _ = completed_session(store, tmp, seed=1, metrics={"val/loss": 3.0})
    s2, _ = completed_session(store, tmp, seed=2, metrics={"val/loss": 2.5})
    before = len(manager.get_model_versions())

    v_auto = manager.save_model(None, s1.id)
    assert isinstance(v_auto, ModelVersion)
    assert isinstance(v_auto.id, str) and v_auto.id.isdigit()  # str over REST and from SQLite alike
    assert v_auto.version == f"v{v_auto.id}"
    assert v_auto.training_session_id == s1.id
    assert v_auto.metrics == {"val/loss": 3.0}  # the session's final metrics by default
    assert v_auto.created_at is not None and v_auto.created_at.tzinfo is not None
    time.sleep(0.02)
    v_named = manager.save_model("release-1.0_a", s2.id, {"val/loss": 2.5, "val/perplexity": 12.2})
    assert v_named.version == "release-1.0_a" and v_named.metrics == {"val/loss": 2.5, "val/perplexity": 12.2}
    assert int(v_named.id) > int(v_auto.id)

    listed = manager.get_model_versions()
    assert len(listed) == before + 2
    assert [v.id for v in listed] == sorted((v.id for v in listed), key=int, reverse=True)
    assert listed[0] == v_named and listed[1] == v_auto
    assert all(isinstance(v.id, str) for v in listed)

    for ref in ("release-1.0_a", v_named.id, "latest"):
        assert store.get_version(ref) == v_named
    for ref in (v_auto.version, v_auto.id):
        assert store.get_version(ref) == v_auto

    # A taken label: an error, nothing overwritten, no version added.
    with pytest.raises(FileExistsError, match="release-1.0_a"):
        manager.save_model("release-1.0_a", s1.id)
    assert manager.get_model_versions() == listed
    assert store.get_version("release-1.0_a").training_session_id == s2.id

    # A session without a model (not completed) cannot be saved.
    pending = store.create_session({})
    with pytest.raises(NotFoundError, match=f"session {pending.id}: no trained model to save; it is pending"):
        manager.save_model("never", pending.id)
    assert len(manager.get_model_versions()) == before + 2


def check_load_model(store, tmp: Path) -> None:
    import torch

    manager = ModelManager(store, tmp / "cache")
    session, digests = completed_session(store, tmp, seed=11)
    mv = manager.save_model("loadable", session.id)
    model, tokenizer = manager.load_model("loadable")
    assert not model.training
    ids = tokenizer("The estuary gateway", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5
    _, directory = manager.model_dir(mv.version)
    assert file_digests(directory) == digests
    assert any(p.suffix == ".safetensors" for p in directory.iterdir())
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in directory.iterdir())
    loaded_by_id, _ = manager.load_model(mv.id)
    for a, b in zip(weights(model).values(), weights(loaded_by_id).values(), strict=True):
        assert torch.equal(a, b)

    with pytest.raises(NotFoundError) as info:
        manager.load_model("no-such-version")
    message = str(info.value)
    assert "no-such-version" in message
    for v in manager.get_model_versions():
        assert v.version in message
    with pytest.raises(NotFoundError, match="loadable"):
        manager.load_model("999999")


def check_aliases(store, tmp: Path) -> None:
    manager = ModelManager(store, tmp / "cache")
    a, _ = completed_session(store, tmp, seed=21)
    b, _ = completed_session(store, tmp, seed=22)
    va = manager.save_model("alias-a", a.id)
    assert store.get_version("latest") == va
    vb = manager.save_model("alias-b", b.id)
    assert store.get_version("latest") == vb  # latest follows the newest

    promoted = manager.promote("alias-a", "champion")
    assert promoted == va and "champion" in promoted.aliases
    assert store.get_version("champion") == va
    assert "champion" in {v.version: v for v in store.list_versions()}["alias-a"].aliases
    model, _ = manager.load_model("champion")
    assert model is not None

    manager.promote(vb.id, "champion")  # moving the alias
    assert store.get_version("champion") == vb
    listed = {v.version: v for v in store.list_versions()}
    assert "champion" in listed["alias-b"].aliases and "champion" not in listed["alias-a"].aliases
    assert store.get_version("latest") == vb

    # MLflow's reserved and refused names (case-insensitive `latest`, `V2`, '.') are kbtune errors,
    # and an alias may not shadow a label (get_version resolves aliases first), nor a label an alias.
    for alias in ("latest", "v1", "3", "bad/alias", "", "LATEST", "V2", "release.1", "alias-b"):
        with pytest.raises(VersionLabelError):
            manager.promote("alias-a", alias)
    assert store.get_version("champion") == vb
    assert store.get_version("alias-b") == vb and store.get_version("alias-a") == va
    c, _ = completed_session(store, tmp, seed=23)
    count = len(store.list_versions())
    with pytest.raises(VersionLabelError, match="alias"):
        manager.save_model("champion", c.id)
    assert len(store.list_versions()) == count
    with pytest.raises(NotFoundError):
        manager.promote("no-such-version", "staging")


INVALID_LABELS = ["../x", "/abs", "a/b", "%2e%2e", "", "latest", "v3", "..", "a..b", "a\\b", " x", "x\n", "v3\n",
                  "-x", "V3", "LATEST", "a" * 101]  # fmt: skip


def check_invalid_labels(store, tmp: Path, artifacts_root: Path | None) -> None:
    manager = ModelManager(store, tmp / "cache")
    session, _ = completed_session(store, tmp, seed=31)
    count = len(manager.get_model_versions())
    tree = artifact_tree(artifacts_root) if artifacts_root else None
    for label in INVALID_LABELS:
        with pytest.raises(VersionLabelError):
            manager.save_model(label, session.id)
    assert len(manager.get_model_versions()) == count
    if artifacts_root:
        assert artifact_tree(artifacts_root) == tree
        assert not (tmp / "x").exists() and not Path("/abs").exists()


def check_concurrent_saves(store, tmp: Path, artifacts_root: Path | None) -> None:
    """8 threads each save a different session's model at once: 8 distinct versions, each pointing at
    its own session's files, untouched."""
    manager = ModelManager(store, tmp / "cache")
    sessions = [completed_session(store, tmp, seed=100 + i) for i in range(8)]
    before = len(manager.get_model_versions())
    tree = artifact_tree(artifacts_root) if artifacts_root else None
    results = race(8, lambda i: manager.save_model(f"conc-{i}", sessions[i][0].id))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert len({r.id for r in results}) == 8
    assert len(manager.get_model_versions()) == before + 8
    for i, (session, digests) in enumerate(sessions):
        mv = store.get_version(f"conc-{i}")
        assert mv == results[i] and mv.training_session_id == session.id
        _, directory = manager.model_dir(mv.version)
        assert file_digests(directory) == digests
    if artifacts_root:
        assert artifact_tree(artifacts_root) == tree  # registering copies nothing and overwrites nothing


def check_concurrent_same_label(store, tmp: Path) -> None:
    """8 threads race for one label: exactly one wins, the others get FileExistsError, one version."""
    manager = ModelManager(store, tmp / "cache")
    sessions = [completed_session(store, tmp, seed=200 + i)[0] for i in range(8)]
    before = len(manager.get_model_versions())
    results = race(8, lambda i: manager.save_model("contested", sessions[i].id))
    winners = [r for r in results if isinstance(r, ModelVersion)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1, results
    assert all(isinstance(e, FileExistsError) for e in losers), losers
    assert len(manager.get_model_versions()) == before + 1
    assert store.get_version("contested") == winners[0]


def check_artifacts_and_history(store, tmp: Path) -> None:
    """Metric history as the plots read it, text and folder artifacts, tags, unknown sessions."""
    session = store.create_session({})
    for step, loss in ((1, 4.0), (2, 3.0), (3, 2.5), (4, 2.0)):
        store.log_metrics(session.id, {"train/loss": loss}, step=step)
    time.sleep(0.01)  # a later timestamp: MLflow tells a re-logged step's latest value by it
    store.log_metrics(session.id, {"train/loss": 2.8}, step=3)  # resumed from step 2's checkpoint
    assert store.metric_history(session.id, "train/loss") == [(1, 4.0), (2, 3.0), (3, 2.8), (4, 2.0)]
    assert store.metric_history(session.id, "val/loss") == []
    assert store.get_session(session.id).metrics == {"train/loss": 2.0}  # the highest step's value

    store.log_text(session.id, "Größe – 温度\n", "data/manifest.json")
    assert store.read_text(session.id, "data/manifest.json") == "Größe – 温度\n"
    staging = tmp / "staging" / "plots"
    (staging / "sub").mkdir(parents=True)
    (staging / "loss.html").write_text("<svg/>")
    (staging / "sub" / "a.txt").write_text("a")
    digests = file_digests(staging)
    uri = store.log_artifacts(session.id, staging, "plots")
    assert uri == store.artifact_uri(session.id, "plots") and uri.endswith("/plots")
    shutil.rmtree(staging)  # the store keeps its own copy (the service deletes its staging folder)
    downloaded = store.download(uri, tmp / "downloads")
    assert file_digests(downloaded) == digests and (downloaded / "sub" / "a.txt").read_text() == "a"
    assert store.read_text(session.id, "plots/sub/a.txt") == "a"

    store.set_tags(session.id, {"kbtune.kb": "/kb", "kbtune.blocks": 3})
    store.set_tags(session.id, {"kbtune.kb": "/other"})  # replaces one tag, keeps the others
    tags = store.get_tags(session.id)
    assert tags["kbtune.kb"] == "/other" and tags["kbtune.blocks"] == "3"
    for read in (store.get_tags, store.artifact_uri, lambda i: store.metric_history(i, "train/loss")):
        with pytest.raises(NotFoundError):
            read("0" * 32)


# -- both stores -----------------------------------------------------------------------------------
@pytest.fixture(params=["mlflow", "memory"])
def store(request, tmp_path):
    # An InMemoryStore deletes its directory when garbage-collected (or at exit at the latest).
    return make_store(tmp_path) if request.param == "mlflow" else InMemoryStore()


def _name(check: Callable[..., None]) -> str:
    return check.__name__.removeprefix("check_")


@pytest.mark.parametrize("check", [check_session_lifecycle, check_round_trip, check_list_sessions], ids=_name)
def test_sessions(store, check):
    check(store)


MODEL_CHECKS = [check_artifacts_and_history, check_versions, check_load_model, check_aliases, check_concurrent_same_label]  # fmt: skip


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=_name)
def test_sessions_with_models(store, tmp_path, check):
    check(store, tmp_path)


@pytest.mark.parametrize("check", [check_invalid_labels, check_concurrent_saves], ids=_name)
def test_saves_write_no_artifacts(store, tmp_path, check):
    # Where each store writes: make_store's artifact_location, or the InMemoryStore's own directory.
    check(store, tmp_path, getattr(store, "artifact_root", tmp_path / "artifacts"))


def test_load_model_with_no_versions_says_so(store, tmp_path):
    with pytest.raises(NotFoundError, match="none"):
        ModelManager(store, tmp_path / "cache").load_model("latest")


def test_store_returns_no_mlflow_types(store, tmp_path):
    session, _ = completed_session(store, tmp_path, seed=41, metrics={"val/loss": 1.0})
    mv = ModelManager(store, tmp_path / "cache").save_model("typed", session.id)
    values = [store.get_session(session.id), *store.list_sessions(), mv, *store.list_versions(), store.get_version("typed"),
              store.get_tags(session.id), store.update_version_metrics(mv.id, {"eval/loss": 1.0})]  # fmt: skip

    def walk(value: Any) -> None:
        assert not type(value).__module__.startswith("mlflow"), type(value)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for value in values:
        walk(value)


def test_update_version_metrics_merges(store, tmp_path):
    session, _ = completed_session(store, tmp_path, seed=51, metrics={"val/loss": 2.0})
    mv = ModelManager(store, tmp_path / "cache").save_model("metrics", session.id)
    updated = store.update_version_metrics("metrics", {"eval/loss": 1.5})
    assert updated.metrics == {"val/loss": 2.0, "eval/loss": 1.5}
    assert store.get_version(mv.id).metrics == updated.metrics


# -- MLflow only: its tag limit, experiments, processes sharing one SQLite file ---------------------
def test_long_error_text_is_kept(tmp_path):
    check_long_error_is_kept(make_store(tmp_path))


def test_sessions_of_another_experiment_are_not_found(tmp_path):
    store, other = make_store(tmp_path), make_store(tmp_path, experiment="other")
    session = other.create_session({"x": 1})
    with pytest.raises(NotFoundError):
        store.get_session(session.id)
    assert session.id not in {s.id for s in store.list_sessions()}


def _save_in_process(db_dir: str, label: str, session_id: str, queue) -> None:
    import os

    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    try:
        mv = ModelManager(make_store(Path(db_dir)), Path(db_dir) / "cache").save_model(label, session_id)
        queue.put(("ok", mv.id, mv.version))
    except Exception as exc:
        queue.put(("error", type(exc).__name__, str(exc)))


@pytest.mark.slow
def test_eight_concurrent_saves_in_processes(tmp_path):
    """Separate processes (as CLI calls or API workers would be), each with its own store, half of
    them racing for one label."""
    import multiprocessing as mp

    store = make_store(tmp_path)
    sessions = [completed_session(store, tmp_path, seed=300 + i) for i in range(8)]
    before = len(store.list_versions())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    labels = [f"proc-{i}" if i % 2 else "proc-shared" for i in range(8)]
    procs = [
        ctx.Process(target=_save_in_process, args=(str(tmp_path), labels[i], sessions[i][0].id, queue))
        for i in range(8)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    ok = [r for r in results if r[0] == "ok"]
    errors = [r for r in results if r[0] == "error"]
    assert sorted(r[2] for r in ok) == sorted(["proc-shared", "proc-1", "proc-3", "proc-5", "proc-7"]), (
        results
    )
    assert len(errors) == 3 and all(e[1] == "FileExistsError" for e in errors), errors
    assert len(store.list_versions()) == before + 5
    manager = ModelManager(store, tmp_path / "cache")
    for label in ("proc-1", "proc-3", "proc-5", "proc-7"):
        i = int(label.split("-")[1])
        mv = store.get_version(label)
        assert mv.training_session_id == sessions[i][0].id
        assert file_digests(manager.model_dir(label)[1]) == sessions[i][1]


# -- InMemoryStore only ---------------------------------------------------------------------------
def test_memory_store_has_every_store_method():
    """Whatever kbtune calls on a store (the Protocol, MlflowStore's log_input), same parameters."""
    from kbtune.tracking.mlflow_store import MlflowStore

    names = {*vars(SessionStore), *vars(MlflowStore)}
    for name in sorted(n for n in names if n[0] != "_" and inspect.isfunction(getattr(MlflowStore, n))):
        got, want = (inspect.signature(getattr(c, name)).parameters for c in (InMemoryStore, MlflowStore))
        assert list(got.values()) == list(want.values()), name  # names, defaults and annotations


def test_memory_store_keeps_everything_in_its_own_directory():
    store = InMemoryStore()
    root, session = store.artifact_root, store.create_session({"seed": 1})
    error = "ValueError: " + "x" * 20000 + " END"  # no tag limit here: the record keeps it whole
    assert store.update_session(session.id, status=SessionStatus.FAILED, error=error).error == error
    store.log_text(session.id, "hello", "notes/a.txt")
    assert store.artifact_uri(session.id, "notes") == f"memory://{session.id}/notes"
    copy = store.download(f"memory://{session.id}/notes")  # no destination: a folder outside `root`
    assert (copy / "a.txt").read_text() == "hello" and root not in copy.parents
    store.log_input(session.id, "kb@1234", "1234", "/kb", {"documents": 3}, {"input_ids": "int32[64]"})
    assert store.inputs(session.id)[0]["profile"] == {"documents": 3}
    runs = []
    for _ in range(2):  # the second, as a resumed session's, continues after the first one's steps
        sampler = store.system_metrics(session.id, interval_s=0.01)
        time.sleep(0.2)
        sampler.finish()
        runs.append(store.metric_history(session.id, "system/system_memory_usage_megabytes"))
    time.sleep(0.05)  # finished: nothing more is sampled
    assert runs[0] and runs[1][: len(runs[0])] == runs[0] and len(runs[1]) > len(runs[0])
    assert [step for step, _ in runs[1]] == list(range(len(runs[1])))
    assert store.metric_history(session.id, "system/system_memory_usage_megabytes") == runs[1]

    # Errors a caller can handle without knowing the store; aliases refused as MLflow refuses them.
    unknown, version = "0" * 32, store.create_version(session.id, "/m", None, None)
    calls = {NotFoundError: [lambda: store.log_metrics(unknown, {"a": 1.0}), lambda: store.set_tags(unknown, {}),
                             lambda: store.create_version(unknown, "/m", None, None), lambda: store.set_alias("9", "c")],
             FileNotFoundError: [lambda: store.read_text(session.id, "missing.txt")],
             ValueError: [lambda: store.log_text(session.id, "x", "../escape.txt")]
             + [lambda a=a: store.set_alias(version.id, a) for a in ("latest", "V2", "bad/alias", "")]}  # fmt: skip
    for error_type, group in calls.items():
        for call in group:
            with pytest.raises(error_type):
                call()
    assert store.tracking_uri == "memory://" and not store.get_tags(session.id)
    store.close()
    assert not root.exists() and not copy.exists()


def test_only_the_tracking_module_imports_mlflow():
    """MLflow's types stay in tracking/mlflow_store.py; pipeline.py (the composition root) builds the
    store and Lightning's MLflow logger."""
    allowed = {SRC / "tracking" / "mlflow_store.py", SRC / "project.py"}
    offenders = []
    for path in SRC.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            # mlflow itself, Lightning's MLFlowLogger, or the adapter module: all only at the root.
            if (
                stripped.startswith(("import ", "from "))
                and "mlflow" in stripped.lower()
                and path not in allowed
            ):
                offenders.append(f"{path.relative_to(SRC)}:{n}: {stripped}")
    assert not offenders
