"""Promotion gated on knowledge: a version takes an alias (e.g. `champion`) only if, on the same probes,
it recalls the trained facts at least as well as the version holding the alias now, and forgets no more
than the limit. The decision and its figures are recorded on the version either way."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger(__name__)

DECISION_TAG = "kbtune.promotion.{alias}"


class PromotionRefused(RuntimeError):
    """The gate said no; `decision` holds the figures. `--force` (force=True) promotes anyway."""

    def __init__(self, decision: PromotionDecision):
        self.decision = decision
        super().__init__(decision.summary())


@dataclass
class PromotionDecision:
    version: str
    alias: str
    promoted: bool
    forced: bool = False
    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    decided_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def summary(self) -> str:
        verdict = "promoted" + (" (forced)" if self.forced else "") if self.promoted else "refused"
        why = "; ".join(self.reasons) or "passes the knowledge gate"
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in self.figures.items())
        hint = "" if self.promoted else " (use --force to promote anyway)"
        return f"{self.alias} -> {self.version}: {verdict}: {why} [{figures}]{hint}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def gate(candidate: dict[str, Any], incumbent: dict[str, Any] | None, max_forgetting: float) -> list[str]:
    """Why the candidate may not take the alias (empty: it may). `candidate`/`incumbent` hold
    `recall_trained` on the same probes and the candidate's `retain_perplexity_change` (if measured)."""
    reasons = []
    if incumbent is not None and candidate["recall_trained"] < incumbent["recall_trained"]:
        reasons.append(f"trained-fact recall drops from {incumbent['recall_trained']:.4f} "
                       f"({incumbent['version']}) to {candidate['recall_trained']:.4f}")  # fmt: skip
    change = candidate.get("retain_perplexity_change")
    if isinstance(change, float) and change > max_forgetting:
        reasons.append(f"forgetting {change:.2%} exceeds --max-forgetting {max_forgetting:.2%}")
    return reasons


class GatedPromotion:
    """`kbtune promote VERSION --alias champion`: evaluate, compare, decide, record, then set the alias."""

    def __init__(self, store: Any, manager: Any, evaluation: Any):
        self.store = store
        self.manager = manager
        self.evaluation = evaluation

    def promote(self, version: str, alias: str = "champion", max_forgetting: float = 0.05, force: bool = False,
                settings: Any = None) -> PromotionDecision:  # fmt: skip
        candidate = self.store.get_version(version)
        incumbent = next((v for v in self.store.list_versions() if alias in v.aliases), None)
        if incumbent is not None and incumbent.id == candidate.id:
            return PromotionDecision(candidate.version, alias, True, reasons=[f"already {alias}"])
        figures = self._figures(candidate, incumbent, settings)
        reasons = gate(figures["candidate"], figures.get("incumbent"), max_forgetting)
        flat = {f"{who}/{k}": v for who, row in figures.items() for k, v in row.items() if k != "version"}
        decision = PromotionDecision(candidate.version, alias, promoted=not reasons or force, forced=bool(reasons) and force,
                                     reasons=reasons, figures={"max_forgetting": max_forgetting, **flat})  # fmt: skip
        self.store.set_version_tags(candidate.id, {DECISION_TAG.format(alias=alias): decision.to_json()})
        if not decision.promoted:
            raise PromotionRefused(decision)
        self.manager.promote(candidate.id, alias)
        logger.info("%s", decision.summary())
        return decision

    def _figures(self, candidate: Any, incumbent: Any, settings: Any) -> dict[str, dict[str, Any]]:
        """Both versions scored on the candidate's probes (the incumbent may have trained on other
        documents: the question is what the candidate's knowledge base asks)."""
        report = self.evaluation.evaluate(candidate.id, settings, record=True)
        row = {"version": candidate.version, "recall_trained": report.metrics.get("knowledge/recall_trained", 0.0)}
        if "knowledge/retain_perplexity_change" in report.metrics:
            row["retain_perplexity_change"] = report.metrics["knowledge/retain_perplexity_change"]
        figures = {"candidate": row}
        if incumbent is not None:
            recall = self.evaluation.recall_of(incumbent.id, report.probes, settings)
            figures["incumbent"] = {"version": incumbent.version, "recall_trained": recall}
        return figures
