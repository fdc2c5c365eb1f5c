"""Small file helpers shared by every stage: atomic writes, JSONL, hashing, package data."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from traitmon.errors import TraitmonError


def data_path(*parts: str) -> Path:
    """Path of a file shipped in ``traitmon/data`` (traits, domains, prompts)."""
    return Path(str(resources.files("traitmon").joinpath("data", *parts)))


def stable_hash(obj) -> str:
    """Short sha256 of a JSON-serialisable object (sorted keys): identifies prompts, settings, data."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``target`` (file or directory).

    A job killed midway leaves only a ``.tmp-*`` sibling, never a half-written target.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    tmp_target = tmp / target.name
    try:
        yield tmp_target
        if target.is_dir() and not target.is_symlink():
            old = target.parent / f".old-{target.name}-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp_target, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_target, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def parse_jsonl_line(line: str, where: str) -> dict:
    """One JSONL row as a dict; ``where`` (``file:line``) names the place of a malformed row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TraitmonError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise TraitmonError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file (blank lines skipped); a malformed row fails naming the file and line number."""
    with open(path, encoding="utf-8") as fh:
        return [parse_jsonl_line(line, f"{path}:{n}") for n, line in enumerate(fh, start=1) if line.strip()]


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_csv(path: str | Path, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
