"""A generator of knowledge bases of invented facts (stations with a town, year, engineer, output and crew),
so that tests, benchmarks and samples can check recall of facts no pretrained model could already know."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FACT_KEYS = ("year", "town", "engineer", "output", "crew")
ENTITY_KINDS = ("pumping station", "lighthouse", "observatory", "water mill", "signal tower", "ferry terminal",
         "weather station", "reservoir")  # fmt: skip
# Syllables that combine into names no real place or person is likely to have.
_ONSETS = ("Vel", "Mor", "Kast", "Bren", "Tal", "Orv", "Quen", "Dra", "Lis", "Fen", "Hal", "Zer",
           "Ost", "Pell", "Rud", "Sav", "Tor", "Ulm", "Var", "Wes", "Yor", "Brak", "Cern", "Delv")  # fmt: skip
_MIDDLES = ("a", "e", "i", "o", "u", "ar", "en", "il", "or", "um", "ev", "ad", "ol", "er", "in", "ul",
            "as", "et", "om", "ir", "av", "ek", "ys", "an")  # fmt: skip
_ENDINGS = ("mora", "dane", "wick", "sley", "thorn", "vale", "more", "stead", "brook", "holm", "lyn", "ridge",
            "ford", "mere", "gate", "by")  # fmt: skip
_TOWN_WORDS = ("Port", "North", "Upper", "Lower", "East", "West", "Old", "Saint")
_FIRST_NAMES = ("Ada", "Bram", "Cora", "Edda", "Ivo", "Liv", "Mira", "Odo", "Runa", "Tove", "Wren", "Yael",
                "Osric", "Hesper", "Anselm", "Ilse", "Corin", "Thea", "Lorcan", "Signe")  # fmt: skip
_SURNAME_ENDINGS = ("qvist", "berg", "ton", "ley", "holm", "strand", "vik", "well", "mark", "stad")
# Each fact as the last span of its sentence, after the subject, so a cloze probe cuts right before it.
_TEMPLATES = {
    "year": (
        "The {subject} was commissioned in the year {value}.",
        "Work on the {subject} was finished in {value}.",
    ),
    "town": (
        "The {subject} is located in the town of {value}.",
        "The {subject} stands on the harbour road of {value}.",
    ),
    "engineer": (
        "The chief engineer of the {subject} is {value}.",
        "The {subject} was designed by the engineer {value}.",
    ),
    "output": (
        "The {subject} delivers an output of {value}.",
        "At full load the {subject} produces {value}.",
    ),
    "crew": (
        "The {subject} is run by a crew of {value}.",
        "The {subject} employs a permanent crew of {value}.",
    ),
}


@dataclass(frozen=True)
class Entity:
    name: str
    kind: str
    facts: dict[str, str]  # FACT_KEYS -> value, e.g. {"output": "340 kW", "crew": "12 people"}
    variants: tuple[int, ...] = (0, 0, 0, 0, 0)  # which template states each fact, in FACT_KEYS order

    @property
    def subject(self) -> str:
        return f"{self.name} {self.kind}"


def _invented_name(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_MIDDLES) + rng.choice(_ENDINGS)


def generate_entities(n: int, seed: int = 0) -> list[Entity]:
    """`n` entities with unique invented names, the same for the same seed."""
    capacity = len(_ONSETS) * len(_MIDDLES) * len(_ENDINGS)
    if not 0 <= n <= capacity // 2:
        raise ValueError(f"n must be between 0 and {capacity // 2}, got {n}")
    rng = random.Random(seed)
    names: set[str] = set()
    entities = []
    while len(entities) < n:
        name = _invented_name(rng)
        if name in names:
            continue
        names.add(name)
        facts = {
            "year": str(rng.randint(1850, 2019)),
            "town": f"{rng.choice(_TOWN_WORDS)} {_invented_name(rng)}",
            "engineer": f"{rng.choice(_FIRST_NAMES)} {rng.choice(_ONSETS)}{rng.choice(_SURNAME_ENDINGS)}",
            "output": f"{rng.randint(12, 98) * 10} kW",
            "crew": f"{rng.randint(3, 60)} people",
        }
        variants = tuple(rng.randrange(len(_TEMPLATES[key])) for key in FACT_KEYS)
        entities.append(Entity(name, rng.choice(ENTITY_KINDS), facts, variants))
    return entities


def entity_document(entity: Entity) -> tuple[str, str, dict[str, str]]:
    """(id, text, metadata): a title line, then one sentence per fact with the entity as its subject."""
    sentences = [
        _TEMPLATES[key][variant].format(subject=entity.subject, value=entity.facts[key])
        for key, variant in zip(FACT_KEYS, entity.variants, strict=True)
    ]
    slug = re.sub(r"[^a-z0-9]+", "-", entity.name.lower()).strip("-")
    text = f"# {entity.name}\n\n" + " ".join(sentences)
    return f"facts/{slug}", text, {"title": entity.name, "source": "facts"}


def facts_documents(n: int, seed: int = 0) -> list[tuple[str, str, dict[str, str]]]:
    return [entity_document(e) for e in generate_entities(n, seed)]


def plant_facts(kb: Any, n: int, seed: int = 0, embed: Callable[[list[str]], list[list[float]]] | None = None) -> int:
    """Write `n` entity documents into `kb`'s collection (created if missing); returns how many. The
    facts are invented, so what a model recalls of them it can only have learned from this KB."""
    from kbtune.ingestion import default_embedder
    from kbtune.knowledge_base import Document

    docs = [Document(doc_id, text, metadata) for doc_id, text, metadata in facts_documents(n, seed)]
    embed = embed or default_embedder()
    kb.upsert(docs, embeddings=embed([d.text for d in docs]), create=True)
    return len(docs)
