"""Trait definitions: one YAML file per trait (description, rubric, contrastive prompts, questions).

Users add a trait by writing ``NAME.yaml`` in a folder listed under ``trait_dirs`` in the config
and naming it under ``traits``. Files are checked at config-load time; errors name file and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from traitmon.errors import TraitmonError
from traitmon.io import data_path, read_text, stable_hash

BUILTIN_TRAIT_DIR = data_path("traits")
MIN_PAIRS = 5
MIN_QUESTIONS = 20


@dataclass(frozen=True)
class PromptPair:
    positive: str
    negative: str


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    rubric: str
    pairs: tuple[PromptPair, ...]
    extraction_questions: tuple[str, ...]
    evaluation_questions: tuple[str, ...]
    path: str = ""

    @property
    def prompt_hash(self) -> str:
        """Hash of everything that shapes the extracted direction (prompts and questions)."""
        return stable_hash(
            {"pairs": [(p.positive, p.negative) for p in self.pairs], "questions": self.extraction_questions}
        )


def _string_list(raw: dict, key: str, path: Path, minimum: int) -> tuple[str, ...]:
    value = raw.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise TraitmonError(f"{path}: field '{key}' must be a list of non-empty strings")
    if len(value) < minimum:
        raise TraitmonError(f"{path}: field '{key}' has {len(value)} entries, at least {minimum} are needed")
    if len(set(value)) != len(value):
        raise TraitmonError(f"{path}: field '{key}' has duplicate entries")
    return tuple(v.strip() for v in value)


def load_trait(path: str | Path) -> Trait:
    path = Path(path)
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise TraitmonError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise TraitmonError(f"{path}: expected a mapping with fields name, description, pairs, ...")
    for key in ("name", "description", "rubric"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise TraitmonError(f"{path}: field '{key}' must be a non-empty string")
    if raw["name"] != path.stem:
        raise TraitmonError(f"{path}: field 'name' is '{raw['name']}' but the file is named '{path.stem}'")
    pairs_raw = raw.get("pairs")
    if not isinstance(pairs_raw, list) or len(pairs_raw) < MIN_PAIRS:
        raise TraitmonError(f"{path}: field 'pairs' must list at least {MIN_PAIRS} positive/negative prompt pairs")
    pairs = []
    for i, pair in enumerate(pairs_raw):
        if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) for k in ("positive", "negative")):
            raise TraitmonError(f"{path}: field 'pairs[{i}]' needs string fields 'positive' and 'negative'")
        pairs.append(PromptPair(pair["positive"].strip(), pair["negative"].strip()))
    extraction = _string_list(raw, "extraction_questions", path, MIN_QUESTIONS)
    evaluation = _string_list(raw, "evaluation_questions", path, MIN_QUESTIONS)
    overlap = set(extraction) & set(evaluation)
    if overlap:
        raise TraitmonError(f"{path}: 'evaluation_questions' repeats extraction questions: {sorted(overlap)[:3]}")
    return Trait(raw["name"], raw["description"].strip(), raw["rubric"].strip(), tuple(pairs),
                 extraction, evaluation, str(path))


def trait_file(name: str, trait_dirs: list[str] | tuple[str, ...] = ()) -> Path:
    """Locate ``NAME.yaml``: user folders first (so a user can override a built-in), then built-ins."""
    searched = [Path(d) for d in trait_dirs] + [BUILTIN_TRAIT_DIR]
    for folder in searched:
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for folder in searched if folder.is_dir() for p in folder.glob("*.yaml")})
    raise TraitmonError(
        f"unknown trait '{name}': no {name}.yaml in {', '.join(str(f) for f in searched)}; known traits: {known}"
    )


def load_traits(names, trait_dirs=()) -> dict[str, Trait]:
    return {name: load_trait(trait_file(name, trait_dirs)) for name in names}
