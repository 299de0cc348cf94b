"""Did a version learn its knowledge base? Fact probes built from the session's own documents (stored
with the session, so every evaluation of every version uses the same ones), scored for the version and
for its starting model side by side, forgetting on a retain set, and a per-document report."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kbtune.knowledge.probes import ProbeSet, ProbeSettings, build_probes

logger = logging.getLogger(__name__)

PROBES_ARTIFACT = "knowledge/probes-{digest}.json"
REPORT_ARTIFACT = "knowledge/documents.json"
PROBES_TAG = "kbtune.knowledge.probes"
RETAIN_TAG = "kbtune.knowledge.retain"
# What forgetting reads for a model trained from scratch: it knew nothing before, so nothing to forget.
NOT_APPLICABLE = "not applicable: the model was trained from scratch (no prior knowledge to forget)"


@dataclass
class KnowledgeReport:
    metrics: dict[str, float]
    documents: list[dict[str, Any]]
    probes: ProbeSet
    notes: dict[str, str] = field(default_factory=dict)

    def worst_trained(self, n: int) -> list[dict[str, Any]]:
        return worst_trained(self.documents, n)

    def to_dict(self, worst: int = 10) -> dict[str, Any]:
        return {**self.metrics, "knowledge/notes": self.notes, "knowledge/worst_trained": self.worst_trained(worst)}


def worst_trained(documents: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The training documents a version learned least: lowest probe recall, then highest loss."""
    rows = [d for d in documents if d["split"] == "train" and d["probes"]]
    return sorted(rows, key=lambda d: (d["recall"], -(d["loss_after"] or 0.0)))[:n]


def _prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()}


def update_roles(store: Any, session_id: str) -> dict[str, Any] | None:
    """For an update session: its parent version and each training document's role (delta, replay,
    carried) from its data manifest; None for any other session."""
    manifest = json.loads(store.read_text(session_id, "data/manifest.json"))
    if not manifest.get("update"):
        return None
    roles = {d["id"]: d["role"] for d in manifest["documents"] if d.get("role")}
    return {"parent": manifest["update"]["base_version"], "roles": roles}


def role_metrics(results: list[Any], roles: dict[str, str]) -> dict[str, float]:
    """Recall of the trained facts split by what the update did with their document: `delta` (added or
    changed since the parent: learned?) and `unchanged` (replayed or carried: kept?)."""
    out: dict[str, float] = {}
    for name, wanted in (("delta", ("delta",)), ("unchanged", ("replay", "carried"))):
        mine = [r for r in results if r.split == "train" and roles.get(r.document_id) in wanted]
        out[f"probes_{name}"] = float(len(mine))
        if mine:
            out[f"recall_{name}"] = sum(r.exact for r in mine) / len(mine)
    return out


def read_retain_texts(source: str, kb: Any, limit: int) -> list[str]:
    """The retain set: a folder's .md/.txt files, else the documents of the Chroma collection `source`."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix in (".md", ".txt"))[:limit]
        texts = [p.read_text(errors="replace") for p in files]
    else:
        texts = [d.text for _, d in zip(range(limit), kb.with_settings(collection=source, where=None).iter_documents(), strict=False)
                 if d.text]  # fmt: skip
    if not texts:
        raise ValueError(f"eval.retain: {source} has no .md/.txt files or documents to measure forgetting on")
    return texts


class KnowledgeEvaluation:
    """Scores a version's knowledge of its session's documents; collaborators as in ModelEvaluation."""

    def __init__(self, kb: Any, store: Any, model_manager: Any):
        self.kb = kb
        self.store = store
        self.model_manager = model_manager

    # -- the probe set -------------------------------------------------------------------------------
    def session_settings(self, session_id: str) -> Any:
        """The `eval` settings the session was trained with (its probe budget, retain set), so a later
        evaluation or a promotion measures what the training's own evaluation measured."""
        from kbtune.configuration import ConfigError, parse_eval
        from kbtune.evaluation import EvalSettings

        problems: list[str] = []
        try:
            settings = parse_eval(self.store.get_session(session_id).config, problems)
        except ConfigError:
            settings = None
        return settings if settings is not None and not problems else EvalSettings()

    def session_documents(self, session_id: str) -> tuple[list[Any], int]:
        """The session's training and held-out documents, exactly those of its data manifest (checked
        against their content hashes), formatted as in training; and its block size."""
        from kbtune.data.preparation import DataSettings, load_documents_for_split

        session = self.store.get_session(session_id)
        manifest = json.loads(self.store.read_text(session_id, "data/manifest.json"))
        data = DataSettings(**{k: v for k, v in (session.config.get("data") or {}).items() if k != "cache_dir"})
        kb = self._session_kb(session.config, manifest["collection"])
        docs = [*load_documents_for_split(kb, manifest, data, "train"), *load_documents_for_split(kb, manifest, data, "val")]
        return docs, data.block_size

    def _session_kb(self, config: dict[str, Any], collection: str) -> Any:
        """The knowledge base the session trained on (its stored kb settings), whatever this project's
        own kb settings say; the project's client when they name the same store."""
        from kbtune.configuration import ConfigError, load_runtime
        from kbtune.knowledge_base import KnowledgeBase

        try:
            own = replace(load_runtime(config).kb, collection=collection)
        except ConfigError:
            return self.kb.with_settings(collection=collection)
        mine = self.kb.settings
        if (own.backend, own.path, own.host, own.port) == (mine.backend, mine.path, mine.host, mine.port):
            return self.kb.with_settings(collection=collection, where=own.where)
        return KnowledgeBase.connect(own)

    def probe_set(self, session_id: str, settings: ProbeSettings, docs: list[Any], record: bool = True) -> ProbeSet:
        """The session's probes for `settings`: read back if stored (so every version of the session is
        scored on the same probes), else built from `docs` and stored."""
        digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:12]
        name = PROBES_ARTIFACT.format(digest=digest)
        try:
            return ProbeSet.from_json(self.store.read_text(session_id, name))
        except Exception:  # not stored yet (each store says so with its own error type)
            pass
        probes = build_probes(docs, {d.id: d.split for d in docs}, settings)
        if record:
            self.store.log_text(session_id, probes.to_json(), name)
            self.store.set_tags(session_id, {PROBES_TAG: name})
        logger.info("built %d probes (%d train / %d held-out) for session %s; skipped %s", len(probes.probes),
                    len(probes.by_split("train")), len(probes.by_split("val")), session_id, probes.skipped)  # fmt: skip
        return probes

    # -- scoring -------------------------------------------------------------------------------------
    def evaluate(self, version: str, settings: Any = None, record: bool = True) -> KnowledgeReport:
        from kbtune.model_manager import load_model_dir

        t0 = time.perf_counter()
        mv, directory = self.model_manager.model_dir(version)
        settings = settings or self.session_settings(mv.training_session_id)
        docs, block_size = self.session_documents(mv.training_session_id)
        probes = self.probe_set(mv.training_session_id, settings.probes, docs, record)
        model, tokenizer = load_model_dir(directory)
        roles = update_roles(self.store, mv.training_session_id)
        start = self._parent_model(roles["parent"]) if roles else self.starting_model(directory)
        probed = {p.document_id for p in probes.probes}
        texts = {d.id: d.formatted for d in docs if d.id in probed}
        after = self._score(model, tokenizer, probes, texts, block_size, settings)
        before = self._score(start, tokenizer, probes, texts, block_size, settings)
        metrics = {**_prefixed(after["metrics"], "knowledge/"), **_prefixed(before["metrics"], "knowledge/start/")}
        if roles:
            # An update: did it learn the change (delta), keep the rest (unchanged; its start is the
            # parent version, so start - after is what the update forgot)?
            metrics.update(_prefixed(role_metrics(after["results"], roles["roles"]), "knowledge/"))
            metrics.update(_prefixed(role_metrics(before["results"], roles["roles"]), "knowledge/start/"))
        notes = {}
        change = self._forgetting(model, start, tokenizer, directory, settings)
        if isinstance(change, float):
            metrics["knowledge/retain_perplexity_change"] = change
        elif change:
            notes["retain_perplexity_change"] = change
        metrics["knowledge/seconds"] = time.perf_counter() - t0
        report = KnowledgeReport(metrics, _document_rows(probes, after, before), probes, notes)
        if record:
            self._record(mv, report)
        logger.info("knowledge of version %s: %s", mv.version, {k: round(v, 3) for k, v in metrics.items()})
        return report

    def _parent_model(self, parent: str) -> Any:
        from kbtune.model_manager import load_model_dir

        return load_model_dir(self.model_manager.model_dir(parent)[1])[0].eval()

    def starting_model(self, directory: Path) -> Any:
        """The untrained init (same seed as training) or the base checkpoint, without any adapter."""
        from kbtune.model_manager import SPEC_FILE
        from kbtune.modeling.factory import ModelSpec, build_model

        spec = ModelSpec.from_dict(json.loads((Path(directory) / SPEC_FILE).read_text()))
        if spec.source == "scratch":
            spec = replace(spec, architecture=spec.architecture if spec.architecture in ("llama", "gpt2") else "llama")
        return build_model(replace(spec, lora=None, gradient_checkpointing=False)).eval()

    @staticmethod
    def _score(model: Any, tokenizer: Any, probes: ProbeSet, texts: dict[str, str], block_size: int,
               settings: Any) -> dict[str, Any]:  # fmt: skip
        from kbtune.knowledge.scoring import document_losses, document_report, knowledge_metrics, score_probes

        results = score_probes(model, tokenizer, probes.probes, batch_size=settings.probe_batch_size)
        losses = document_losses(model, tokenizer, texts, block_size, max(1, settings.probe_batch_size // 2))
        return {"metrics": knowledge_metrics(results), "documents": document_report(results), "losses": losses,
                "results": results}  # fmt: skip

    def _forgetting(self, model: Any, start: Any, tokenizer: Any, directory: Path, settings: Any) -> float | str | None:
        """Relative change of perplexity on the retain set, trained vs starting model."""
        from kbtune.knowledge.scoring import text_perplexity
        from kbtune.model_manager import SPEC_FILE

        if settings.retain is None:
            return None
        if json.loads((Path(directory) / SPEC_FILE).read_text()).get("source") == "scratch":
            return NOT_APPLICABLE
        texts = read_retain_texts(settings.retain, self.kb, settings.retain_max_documents)
        block = min(256, getattr(model.config, "max_position_embeddings", 256) or 256)
        before = text_perplexity(start, tokenizer, texts, block, settings.probe_batch_size // 2 or 1)
        after = text_perplexity(model, tokenizer, texts, block, settings.probe_batch_size // 2 or 1)
        return (after - before) / before

    def recall_of(self, version: str, probes: ProbeSet, settings: Any = None) -> float:
        """Trained-fact recall of `version` on another version's probes (promotion compares on one set)."""
        from kbtune.evaluation import EvalSettings
        from kbtune.knowledge.scoring import knowledge_metrics, score_probes
        from kbtune.model_manager import load_model_dir

        settings = settings or EvalSettings()
        model, tokenizer = load_model_dir(self.model_manager.model_dir(version)[1])
        trained = probes.by_split("train")
        results = score_probes(model, tokenizer, trained, batch_size=settings.probe_batch_size)
        return knowledge_metrics(results).get("recall_trained", 0.0)

    def _record(self, mv: Any, report: KnowledgeReport) -> None:
        self.store.log_metrics(mv.training_session_id, report.metrics)
        self.store.update_version_metrics(mv.id, report.metrics)
        self.store.log_text(mv.training_session_id, json.dumps(report.documents, indent=1), REPORT_ARTIFACT)
        if report.notes:
            self.store.set_tags(mv.training_session_id, {RETAIN_TAG: report.notes.get("retain_perplexity_change", "")})


def _document_rows(probes: ProbeSet, after: dict[str, Any], before: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per probed document: its split, probe count, recall before and after, and the mean token
    loss of the whole document read on its own, before and after."""
    rows = []
    for doc_id, row in sorted(after["documents"].items()):
        start = before["documents"].get(doc_id, {})
        rows.append({"document_id": doc_id, "split": row["split"], "probes": row["probes"],
                     "recall": row["recall"], "recall_before": start.get("recall"), "f1": row["f1"],
                     "loss_after": after["losses"].get(doc_id), "loss_before": before["losses"].get(doc_id)})  # fmt: skip
    return rows
