"""Small file helpers shared by every stage: atomic writes, JSONL, hashing, package data."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
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


def _stale_siblings(target: Path) -> list[Path]:
    """Temporaries a killed writer of ``target`` left: ``.tmp-NAME-XXXXXXXX`` and ``.old-NAME-PID``.

    The patterns match this target only (``.tmp-a-b-XXXXXXXX`` belongs to ``a-b``, not to ``a``).
    """
    name = re.escape(target.name)
    pattern = re.compile(rf"\.tmp-{name}-[a-z0-9_]{{8}}|\.old-{name}-\d+")
    return [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces ``target`` (file or directory).

    A job killed midway leaves only a ``.tmp-*`` sibling, never a half-written target; the next write of the
    same target removes such leftovers first (one writer per target, as the workflow guarantees).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_siblings(target):
        shutil.rmtree(stale, ignore_errors=True)
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


def read_text_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file; bytes that are not UTF-8 fail naming the file and line."""
    with open(path, "rb") as fh:
        raw = fh.read().splitlines(keepends=True)
    lines = []
    for n, line in enumerate(raw, start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise TraitmonError(f"{path}:{n}: not UTF-8 text (byte {line[exc.start]:#04x} at column "
                                f"{exc.start + 1}); save the file as UTF-8") from None
    return lines


def read_text(path: str | Path) -> str:
    return "".join(read_text_lines(path))


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file (blank lines skipped); a malformed row fails naming the file and line number."""
    return [parse_jsonl_line(line, f"{path}:{n}")
            for n, line in enumerate(read_text_lines(path), start=1) if line.strip()]


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_csv(path: str | Path, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
