"""What `cityhealth import` reads: the paths given, in order (a directory contributes its files
in name order), Bundle files whole and NDJSON files in chunks of lines, with the checksums the
import journal keys them by."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BUNDLE = "bundle"
NDJSON = "ndjson"
_SUFFIXES = {".json": BUNDLE, ".json.gz": BUNDLE, ".ndjson": NDJSON, ".ndjson.gz": NDJSON}
#: Lines per NDJSON chunk (one transaction, one journal row). Chunk checksums depend on it, so a
#: changed value would make a resumed import redo (and, without ids, duplicate) finished chunks.
CHUNK_LINES = 500


@dataclass(frozen=True)
class SourceFile:
    path: Path
    kind: str | None  # BUNDLE or NDJSON; None when the path cannot be imported
    walked: bool = False  # found in a directory rather than named on the command line
    problem: str | None = None  # why the path cannot be imported

    @property
    def label(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Chunk:
    """Consecutive lines of an NDJSON file; `lines` keep their line ends."""

    path: str
    first_line: int
    lines: tuple[bytes, ...]

    @property
    def last_line(self) -> int:
        return self.first_line + len(self.lines) - 1

    @property
    def source(self) -> str:
        return f"{Path(self.path).name}:{self.first_line}-{self.last_line}"

    def checksum(self) -> str:
        # The name and line range take part so that equal lines in two places stay distinct.
        digest = hashlib.sha256(f"{self.source}\n".encode())
        for line in self.lines:
            digest.update(line)
        return digest.hexdigest()

    def numbered(self) -> Iterator[tuple[int, bytes]]:
        return enumerate(self.lines, self.first_line)


def kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def expand(paths: list[Path]) -> list[list[SourceFile]]:
    """The files of each path, in the order given; a file met a second time is left out."""
    seen: set[Path] = set()
    groups = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                (f for f in path.rglob("*") if f.is_file() and kind_of(f)),
                key=lambda f: f.relative_to(path).as_posix(),
            )
            candidates = [SourceFile(f, kind_of(f), walked=True) for f in found]
        elif path.is_file():
            kind = kind_of(path)
            problem = None if kind else "not a .json, .json.gz, .ndjson or .ndjson.gz file"
            candidates = [SourceFile(path, kind, problem=problem)]
        else:
            candidates = [SourceFile(path, None, problem="no such file or directory")]
        group = []
        for candidate in candidates:
            key = candidate.path.resolve()
            if key not in seen:
                seen.add(key)
                group.append(candidate)
        groups.append(group)
    return groups


def read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it is gzipped."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.lower().endswith(".gz") else data


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _open(path: Path) -> BinaryIO | gzip.GzipFile:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def chunks(path: Path, size: int = CHUNK_LINES) -> Iterator[Chunk]:
    with _open(path) as lines:
        batch: list[bytes] = []
        first = 1
        for line in lines:
            batch.append(line)
            if len(batch) == size:
                yield Chunk(str(path), first, tuple(batch))
                first += size
                batch = []
        if batch:
            yield Chunk(str(path), first, tuple(batch))
