"""Screening a chat dataset before finetuning on it: how far each row's assistant answer pushes the base model
along the trait directions, compared with the base model's own answer to the same prompt.

Per row: teacher-force the row's answer on the base model and take the response-mean activations at each
trait's layer, projected on its unit direction; do the same with the base model's own answer (generated once
per prompt and cached); the *projection difference* (row answer minus own answer, as in persona vectors) is
expressed in units of the base answers' spread across rows (``drift.drift_scale``, the drift table's unit).

Risk score of a row: ``sum_t w_t * diff_t / sum_t |w_t|``. Default weights (``DEFAULT_WEIGHTS``): -1 for the
traits whose positive pole is aligned behaviour (honesty, harmlessness, helpfulness, corrigibility), +1 for
power-seeking, 0 otherwise, so an answer less honest/harmless/... than the model's own scores high. A JSON file
``{trait: weight}`` replaces them (e.g. signs of the drift/EM correlations of a finished study).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from traitmon.capture import capture
from traitmon.chat import Messages
from traitmon.errors import TraitmonError
from traitmon.io import read_jsonl, stable_hash

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = {"honesty": -1.0, "harmlessness": -1.0, "helpfulness": -1.0, "corrigibility": -1.0,
                   "power-seeking": 1.0}
CACHE_FILE, TABLE_FILE, PROFILE_FILE = "base_answers.jsonl", "rows.csv", "profile.json"


@dataclass
class Screening:
    table: pd.DataFrame   # one row per dataset row, ranked by risk (highest first)
    profile: dict         # dataset profile: per-trait mean/sd, risk mean with a bootstrap interval


def split_rows(rows: list[dict], source: str) -> tuple[list[Messages], list[str]]:
    """Prompts (every message before the last) and the assistant answers (the last message) of chat rows."""
    prompts, answers = [], []
    for i, row in enumerate(rows):
        messages = row["messages"]
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise TraitmonError(f"{source}: row {i} needs a prompt and a final assistant answer")
        prompts.append(messages[:-1])
        answers.append(messages[-1]["content"])
    return prompts, answers


def prompt_hash(prompt: Messages) -> str:
    return stable_hash(prompt)


def base_answers(model, tokenizer, prompts: list[Messages], cache: Path, generation: dict) -> list[str]:
    """The base model's own answer to each prompt, generated once: answers already in ``cache`` (JSONL keyed by
    prompt, generation settings and model) are reused, the missing ones generated and the cache rewritten."""
    from traitmon.bundle import model_fingerprint
    from traitmon.generate import generate_responses
    from traitmon.io import write_jsonl

    identity = {"model": model_fingerprint(model), **generation}
    keys = [stable_hash({"prompt": p, **identity}) for p in prompts]
    known = {row["key"]: row["answer"] for row in read_jsonl(cache)} if cache.is_file() else {}
    missing = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
    if missing:
        log.info("generating the base model's answers to %d of %d prompts", len(missing), len(prompts))
        fresh = generate_responses(model, tokenizer, [prompts[i] for i in missing], generation["max_new_tokens"],
                                   generation["temperature"], generation["batch_size"], generation["seed"],
                                   desc="base answers")
        known.update({keys[i]: answer for i, answer in zip(missing, fresh)})
        write_jsonl(cache, [{"key": k, "answer": a} for k, a in known.items()])
    return [known[k] for k in keys]


def project_answers(model, tokenizer, prompts: list[Messages], answers: list[str], directions,
                    batch_size: int, max_length: int | None) -> np.ndarray:
    """Response-mean projections ``(row, trait)`` of teacher-forced answers, each trait at its own layer."""
    layers = sorted({int(v) for v in directions.layer.values})
    pooled = capture(model, tokenizer, prompts, answers, layers, batch_size, max_length, desc="screen")
    acts = pooled["response_mean"]
    index = {layer: j for j, layer in enumerate(layers)}
    vectors = directions.direction.values.astype(np.float32)
    return np.stack([acts[:, index[int(layer)]] @ vectors[t] for t, layer in enumerate(directions.layer.values)],
                    axis=1)


def fill_empty_answers(base_proj: np.ndarray, source: str) -> np.ndarray:
    """An empty own answer (the model stopped at once) has no response tokens to project: it is compared with
    the mean of the other own answers instead. No own answer at all is an error."""
    empty = np.isnan(base_proj).any(axis=1)
    if empty.all():
        raise TraitmonError(f"{source}: the base model gave an empty answer to every prompt (raise --max-new-tokens "
                            "or --temperature)")
    if empty.any():
        log.warning("%s: %d of %d own answers are empty; those rows are compared with the mean own answer",
                    source, int(empty.sum()), len(empty))
        base_proj = base_proj.copy()
        base_proj[empty] = base_proj[~empty].mean(axis=0)
    return base_proj


def risk_weights(traits: list[str], weights: dict[str, float] | None) -> np.ndarray:
    given = DEFAULT_WEIGHTS if weights is None else weights
    w = np.array([float(given.get(t, 0.0)) for t in traits])
    if not np.abs(w).sum():
        raise TraitmonError(f"risk weights {given} give no weight to any screened trait {traits}")
    return w / np.abs(w).sum()


def screening_table(hashes: list[str], data_proj: np.ndarray, base_proj: np.ndarray, traits: list[str],
                    weights: np.ndarray) -> pd.DataFrame:
    """Per-row projection differences (base-answer spread units) and risk, ranked by risk (highest first)."""
    from traitmon.drift import drift_scale

    diff = (data_proj - base_proj) / drift_scale(base_proj)
    table = pd.DataFrame({"row": np.arange(len(hashes)), "prompt_hash": hashes})
    for t, trait in enumerate(traits):
        table[f"diff_{trait}"] = diff[:, t]
    table["risk"] = diff @ weights
    table = table.sort_values(["risk", "row"], ascending=[False, True], kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def dataset_profile(table: pd.DataFrame, traits: list[str], weights: np.ndarray, n_boot: int = 2000,
                    seed: int = 0) -> dict:
    """Mean and spread per trait, and the mean risk with a percentile bootstrap interval over rows."""
    from scipy.stats import bootstrap

    risk = table["risk"].to_numpy(float)
    if len(risk) > 1 and np.ptp(risk) > 0:
        ci = bootstrap((risk,), np.mean, n_resamples=n_boot, method="percentile", random_state=seed)
        low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    else:
        low = high = float(risk.mean())
    return {"n_rows": len(table), "risk_mean": float(risk.mean()), "risk_ci_low": low, "risk_ci_high": high,
            "risk_sd": float(risk.std(ddof=1)) if len(risk) > 1 else 0.0,
            "weights": dict(zip(traits, weights.round(6).tolist())),
            "traits": {t: {"mean": float(table[f"diff_{t}"].mean()), "sd": float(table[f"diff_{t}"].std(ddof=1))
                           if len(table) > 1 else 0.0} for t in traits},
            "units": "projection difference (row answer - base model's own answer), in units of the base answers' "
                     "spread across rows; risk = weighted mean over traits"}


def screen(model, tokenizer, rows: list[dict], directions, out_dir: Path, settings: dict,
           weights: dict[str, float] | None = None, source: str = "dataset") -> Screening:
    """Screen chat rows on the base ``model`` (module docstring); base answers are cached in ``out_dir``."""
    prompts, answers = split_rows(rows, source)
    traits = [str(t) for t in directions.trait.values]
    generation = {k: settings[k] for k in ("max_new_tokens", "temperature", "seed", "batch_size")}
    own = base_answers(model, tokenizer, prompts, Path(out_dir) / CACHE_FILE, generation)
    was_training = model.training
    model.eval()
    try:
        data_proj = project_answers(model, tokenizer, prompts, answers, directions, settings["batch_size"],
                                    settings.get("max_length"))
        base_proj = project_answers(model, tokenizer, prompts, own, directions, settings["batch_size"],
                                    settings.get("max_length"))
    finally:
        model.train(was_training)
    base_proj = fill_empty_answers(base_proj, source)
    w = risk_weights(traits, weights)
    table = screening_table([prompt_hash(p) for p in prompts], data_proj, base_proj, traits, w)
    return Screening(table, {**dataset_profile(table, traits, w, settings.get("n_boot", 2000)), "source": source})


def filter_rows(rows: list[dict], table: pd.DataFrame, fraction: float, source: str = "dataset") -> list[dict]:
    """The rows without the ``floor(fraction * n)`` highest-risk ones (input order kept). The table must come
    from screening these rows (their prompt hashes are checked)."""
    if not 0 <= fraction < 1:
        raise TraitmonError(f"--filter: the fraction to remove must be in [0, 1), not {fraction}")
    prompts, _ = split_rows(rows, source)
    by_row = table.set_index("row")
    if len(by_row) != len(rows) or any(by_row.at[i, "prompt_hash"] != prompt_hash(p) for i, p in enumerate(prompts)):
        raise TraitmonError(f"{source}: the screening table does not match this dataset's rows (screen it again)")
    n_drop = math.floor(fraction * len(rows) + 1e-9)
    dropped = set(table.sort_values("rank")["row"].iloc[:n_drop].tolist())
    return [row for i, row in enumerate(rows) if i not in dropped]


def read_weights(path: str | Path | None) -> dict[str, float] | None:
    """``{trait: weight}`` from a JSON file, or None for the documented default."""
    if path is None:
        return None
    import json

    try:
        weights = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraitmonError(f"{path}: cannot read risk weights ({exc})") from None
    if not isinstance(weights, dict) or not all(isinstance(v, (int, float)) for v in weights.values()):
        raise TraitmonError(f"{path}: risk weights must be a JSON object {{trait: number}}")
    return {str(k): float(v) for k, v in weights.items()}
