"""The prepared-data cache: token blocks as Arrow tables (memory-mapped on load) plus the manifest,
written atomically under a key of everything that produced them, so a half-written cache is never
visible and a rerun with the same inputs loads instead of preparing."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kbtune.data.cleaning import CleanDoc

AUGMENTATION_FILE = "augmentation.json"
# The data manifest's per-document entries, a JSON list; manifest.json holds the rest.
DOCUMENTS_FILE = "documents.json"


def write_prepared(directory: Path, arrays: dict[str, np.ndarray | None], manifest: dict[str, Any],
                   documents: Iterable[dict[str, Any]], augmentation: dict[str, Any] | None = None,
                   ids: list[str] | None = None) -> None:  # fmt: skip
    """`ids`: every id the preparation read (for corpus.SourceIndex)."""
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()  # one bar per split for a sub-second write is noise
    tmp = directory.with_name(directory.name + f".tmp{time.time_ns()}")
    for split in ("train", "val"):
        columns = {"input_ids": arrays[split]}
        if arrays[f"{split}_labels"] is not None:
            columns["labels"] = arrays[f"{split}_labels"]
        table = pa.table(
            {
                name: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.int32()), a.shape[1])
                for name, a in columns.items()
            }
        )
        # An explicit fingerprint: without one, datasets pickles and hashes the whole table to make
        # one (4x the table's memory at peak, ~0.3 s per 65k blocks).
        datasets.Dataset(table, fingerprint=f"kbtune-{directory.name}-{split}").save_to_disk(str(tmp / split))
    if augmentation is not None:
        # The training texts and question/answer pairs the per-epoch views are built from.
        with open(tmp / AUGMENTATION_FILE, "w") as f:
            json.dump(augmentation, f)
    write_documents(tmp / DOCUMENTS_FILE, documents)
    if ids is not None:
        from kbtune.data.corpus import write_ids

        write_ids(tmp, ids)
    with open(tmp / "manifest.json", "w") as f:  # last: its presence marks a complete entry
        json.dump(manifest, f, indent=1)
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(directory)  # atomic: a half-written cache is never visible under its key
    except OSError:
        if not (directory / "manifest.json").exists():
            raise
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same key first


def load_prepared(directory: Path) -> tuple[dict[str, np.ndarray | None], dict[str, Any]]:
    """(arrays by split, manifest) of a cache entry written by write_prepared."""
    import datasets

    def blocks(table: Any, name: str) -> np.ndarray:
        # Straight from the memory-mapped Arrow column: going through the Dataset's numpy
        # formatting converts row by row (~10 s for 36k blocks).
        column = table.column(name).combine_chunks()
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)

    out: dict[str, np.ndarray | None] = {}
    for split in ("train", "val"):
        table = datasets.load_from_disk(str(directory / split)).data
        out[split] = blocks(table, "input_ids").astype(np.int32)
        out[f"{split}_labels"] = (
            blocks(table, "labels").astype(np.int64) if "labels" in table.column_names else None
        )
    manifest = json.loads((directory / "manifest.json").read_text())
    return out, manifest


def write_documents(path: Path, documents: Iterable[dict[str, Any]]) -> None:
    """One entry a line, each encoded on its own: a million entries as one string would peak at
    ~150 MB, and json.dump encodes item by item in Python (several seconds)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i, entry in enumerate(documents):
            f.write((",\n " if i else "\n ") + json.dumps(entry))
        f.write("\n]")


def documents_text(directory: Path) -> str:
    return (directory / DOCUMENTS_FILE).read_text(encoding="utf-8")


def load_documents(directory: Path) -> list[dict[str, Any]]:
    return json.loads(documents_text(directory))


def load_augmentation(directory: Path) -> dict[str, Any] | None:
    path = directory / AUGMENTATION_FILE
    return json.loads(path.read_text()) if path.exists() else None


class DocumentRecords:
    """The data manifest's per-document entries (id, sha256 of the cleaned text, split), kept compact
    while a large KB streams past: the digests in one bytearray, the splits as one byte each."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._digests = bytearray()
        self._splits = bytearray()
        self._roles: dict[int, str] = {}

    def add(self, doc: CleanDoc) -> None:
        if doc.role:
            self._roles[len(self.ids)] = doc.role
        self.ids.append(doc.id)
        self._digests += bytes.fromhex(doc.sha256)
        self._splits.append(doc.split == "val")

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i, doc_id in enumerate(self.ids):
            entry = {"id": doc_id, "sha256": self._digests[32 * i : 32 * i + 32].hex(),
                     "split": "val" if self._splits[i] else "train"}  # fmt: skip
            if i in self._roles:
                entry["role"] = self._roles[i]
            yield entry
