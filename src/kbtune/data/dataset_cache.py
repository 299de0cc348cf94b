"""The prepared-data cache: token blocks as .npy files (memory-mapped on load) plus the manifest,
written into a temporary folder and renamed to a key of everything that produced them, so a
half-written cache is never visible and a rerun with the same inputs loads instead of preparing.

The blocks are appended to their files while the KB streams past (as nanoGPT writes its token bins):
preparing a million documents never holds their tokens in memory, and a rerun maps them in ~0 s."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from kbtune.atomic_files import TEMP_SUFFIX, remove_stale_temps

if TYPE_CHECKING:
    from kbtune.data.cleaning import CleanDoc

AUGMENTATION_FILE = "augmentation.json"
# The data manifest's per-document entries, a JSON list; manifest.json holds the rest.
DOCUMENTS_FILE = "documents.json"
ARRAYS = ("train", "val", "train_labels", "val_labels")
# Room left for the .npy header, written once the shape is known: 10 bytes of magic and length plus a
# dict of ~80 characters, padded to a multiple of 64 so the data stays aligned.
NPY_HEADER = 128


class TokenFile:
    """One array of a cache entry, grown by appending rows (or a flat stream) and closed into a .npy
    file of rows of `width`; a flat stream's tail shorter than a row is cut off."""

    def __init__(self, path: Path, dtype: Any, width: int):
        self.path, self.dtype, self.width = path, np.dtype(dtype), width
        self._file: BinaryIO | None = open(path, "wb")  # noqa: SIM115  (closed by close())
        self._file.write(b"\0" * NPY_HEADER)
        self.items = 0

    def append(self, values: np.ndarray) -> None:
        assert self._file is not None
        np.ascontiguousarray(values, dtype=self.dtype).tofile(self._file)
        self.items += values.size

    def close(self) -> np.ndarray:
        """The .npy file complete; its rows, memory-mapped."""
        assert self._file is not None
        rows = self.items // self.width
        header = f"{{'descr': {self.dtype.str!r}, 'fortran_order': False, 'shape': ({rows}, {self.width}), }}"
        body = header.encode("latin1").ljust(NPY_HEADER - 11) + b"\n"
        assert len(body) == NPY_HEADER - 10, header
        self._file.truncate(NPY_HEADER + rows * self.width * self.dtype.itemsize)
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body)
        self._file.close()
        self._file = None
        return np.load(self.path, mmap_mode="r")


class PendingEntry:
    """A cache entry being written: a temporary folder among the entries, renamed to its key once
    complete (or removed, if preparing fails)."""

    def __init__(self, cache_dir: Path):
        self.root = Path(cache_dir) / "datasets"
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.root)  # entries a killed preparation left half-written
        self.tmp = self.root / f".entry-{time.time_ns()}.{os.getpid()}{TEMP_SUFFIX}"
        self.tmp.mkdir()

    def array(self, name: str, dtype: Any, width: int) -> TokenFile:
        return TokenFile(self.tmp / f"{name}.npy", dtype, width)

    def commit(self, key: str, manifest: dict[str, Any], documents: Iterable[dict[str, Any]],
               augmentation: dict[str, Any] | None = None, ids: list[str] | None = None) -> Path:  # fmt: skip
        """Write the rest and move the entry under `key`. `ids`: every id the preparation read (for
        corpus.SourceIndex)."""
        directory = self.root / key
        if augmentation is not None:
            # The training texts and question/answer pairs the per-epoch views are built from.
            with open(self.tmp / AUGMENTATION_FILE, "w") as f:
                json.dump(augmentation, f)
        write_documents(self.tmp / DOCUMENTS_FILE, documents)
        if ids is not None:
            from kbtune.data.corpus import write_ids

            write_ids(self.tmp, ids)
        with open(self.tmp / "manifest.json", "w") as f:  # last: its presence marks a complete entry
            json.dump(manifest, f, indent=1)
        try:
            self.tmp.rename(directory)  # atomic: a half-written cache is never visible under its key
        except OSError:
            if not (directory / "manifest.json").exists():
                raise
            self.discard()  # another process wrote the same key first
        return directory

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def load_prepared(directory: Path) -> tuple[dict[str, np.ndarray | None], dict[str, Any]]:
    """(arrays by name, memory-mapped, None where absent; manifest) of a cache entry."""
    out = {name: np.load(directory / f"{name}.npy", mmap_mode="r") if (directory / f"{name}.npy").exists() else None
           for name in ARRAYS}  # fmt: skip
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
