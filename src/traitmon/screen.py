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

Two steps, so that adding a trait reuses the model work: ``screen_activations`` (the expensive, trait-independent
part: own answers, teacher-forced response means of both answers at every stored layer) and
``screen_from_activations`` (the projection on the directions, per-row table and profile). ``screen`` composes them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from traitmon.capture import capture
from traitmon.chat import Messages
from traitmon.errors import TraitmonError
from traitmon.io import read_jsonl, stable_hash

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = {"honesty": -1.0, "harmlessness": -1.0, "helpfulness": -1.0, "corrigibility": -1.0,
                   "power-seeking": 1.0}
CACHE_FILE, TABLE_FILE, PROFILE_FILE = "base_answers.jsonl", "rows.csv", "profile.json"
# the activation store: response means of each row's answer ("data") and of the base model's own answer ("own")
ANSWERS, ACTIVATIONS = ("data", "own"), "response_mean"
STORE_DIMS = ("answer", "row", "layer", "hidden")
GENERATION_KEYS = ("max_new_tokens", "temperature", "seed", "batch_size")


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
                                   desc="base answers", precision=generation.get("precision", "fp32"))
        known.update({keys[i]: answer for i, answer in zip(missing, fresh)})
        write_jsonl(cache, [{"key": k, "answer": a} for k, a in known.items()])
    return [known[k] for k in keys]


def screen_activations(model, tokenizer, rows: list[dict], cache_dir: Path, settings: dict,
                       layers: list[int] | None = None, source: str = "dataset",
                       attrs: dict | None = None) -> xr.Dataset:
    """Teacher-forced response-mean activations ``(answer, row, layer, hidden)`` float32 of each row's answer
    (``answer='data'``) and of the base model's own answer (``'own'``, generated once, cached in ``cache_dir``),
    with per-row ``prompt_hash``. ``layers``: hidden_states indices, None for every layer. Independent of traits."""
    from traitmon.config import check_layers
    from traitmon.hooks import num_layers

    prompts, answers = split_rows(rows, source)
    if layers is None:
        layers = list(range(num_layers(model) + 1))
    layers = list(dict.fromkeys(int(layer) for layer in layers))  # a repeated layer would break selection
    check_layers(layers, num_layers(model), "--layers")
    generation = {k: settings[k] for k in GENERATION_KEYS}
    from traitmon.precision import for_model

    precision = for_model(settings.get("precision", "fp32"), model, "screening")  # what ran, never "auto"
    if precision != "fp32":  # float32 answers keep the cache keys they had before
        generation["precision"] = precision
    own = base_answers(model, tokenizer, prompts, Path(cache_dir) / CACHE_FILE, generation)
    was_training = model.training
    model.eval()
    try:
        pooled = [capture(model, tokenizer, prompts, texts, layers, settings["batch_size"], settings.get("max_length"),
                          precision=precision, desc=f"screen {name}")["response_mean"] for name, texts in zip(ANSWERS, (answers, own))]
    finally:
        model.train(was_training)
    return xr.Dataset({ACTIVATIONS: (STORE_DIMS, np.stack(pooled).astype(np.float32))},
                      coords={"answer": list(ANSWERS), "row": np.arange(len(rows)), "layer": layers,
                              "prompt_hash": ("row", [prompt_hash(p) for p in prompts])},
                      attrs={**(attrs or {}), "source": source, "stored_dtype": "float32",
                             "precision": precision,
                             "max_length": settings.get("max_length"),
                             **{f"own_answers_{k}": v for k, v in generation.items()}})


def project_activations(acts: xr.Dataset, directions: xr.Dataset, source: str) -> dict[str, np.ndarray]:
    """Projections ``(row, trait)`` of each answer kind (``{'data': ..., 'own': ...}``), each trait at its own
    layer. Only the traits' layers are read from a lazily opened store."""
    held = [int(v) for v in acts.layer.values]
    for trait, layer in zip(directions.trait.values, directions.layer.values):
        if int(layer) not in held:
            raise TraitmonError(f"{source}: trait '{trait}' is at layer {int(layer)}, which this activation store does "
                                f"not hold (layers {held}); store its activations again with that layer")
    if acts.sizes["hidden"] != directions.sizes["hidden"]:
        raise TraitmonError(f"{source}: activations have hidden size {acts.sizes['hidden']}, the directions "
                            f"{directions.sizes['hidden']} (directions of another model?)")
    layers = sorted({int(v) for v in directions.layer.values})
    values = acts[ACTIVATIONS].sel(layer=layers).astype(np.float32).load()
    vectors = directions.direction.values.astype(np.float32)
    return {answer: np.stack([np.ascontiguousarray(values.sel(answer=answer, layer=int(layer)).values) @ vectors[t]
                              for t, layer in enumerate(directions.layer.values)], axis=1) for answer in ANSWERS}


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


def screen_from_activations(acts: xr.Dataset, directions, weights: dict[str, float] | None = None,
                            n_boot: int = 2000, source: str = "dataset") -> Screening:
    """Screen from an activation store (``screen_activations``): project each trait at its layer, compare each
    row's answer with the own answer, rank by risk and profile the dataset (module docstring)."""
    traits = [str(t) for t in directions.trait.values]
    proj = project_activations(acts, directions, source)
    base_proj = fill_empty_answers(proj["own"], source)
    w = risk_weights(traits, weights)
    table = screening_table([str(h) for h in acts.prompt_hash.values], proj["data"], base_proj, traits, w)
    return Screening(table, {**dataset_profile(table, traits, w, n_boot), "source": source})


def screen(model, tokenizer, rows: list[dict], directions, out_dir: Path, settings: dict,
           weights: dict[str, float] | None = None, source: str = "dataset") -> Screening:
    """Screen chat rows on the base ``model`` (module docstring) in one go, at the directions' layers only;
    base answers are cached in ``out_dir``."""
    layers = sorted({int(v) for v in directions.layer.values})
    acts = screen_activations(model, tokenizer, rows, out_dir, settings, layers, source)
    return screen_from_activations(acts, directions, weights, settings.get("n_boot", 2000), source)


def read_activations(path: str | Path) -> xr.Dataset:
    """An activation store written by ``traitmon screen --activations-out``, opened lazily."""
    from traitmon.store import open_dataset

    if not Path(path).is_dir():
        raise TraitmonError(f"{path}: no such activation store")
    try:
        ds = open_dataset(path)
    except (OSError, ValueError, KeyError) as exc:  # zarr's errors for a folder that is no store are among these
        raise TraitmonError(f"{path}: cannot read activation store ({type(exc).__name__}: {exc})") from None
    if ACTIVATIONS not in ds or ds[ACTIVATIONS].dims != STORE_DIMS or "prompt_hash" not in ds.coords:
        raise TraitmonError(f"{path}: not a screening activation store (write one with traitmon screen "
                            "--activations-out)")
    return ds


def screen_stores(stores: dict[str, xr.Dataset], directions: dict[str, xr.Dataset],
                  weights: dict[str, float] | None = None, n_boot: int = 2000) -> tuple[pd.DataFrame, list[dict]]:
    """Screen activation stores (``{path: store}``, labelled by their ``model``/``perturbation`` attrs) with their
    model's directions (``{model: directions}``): every per-row table in one, with model and perturbation
    columns, and the labelled profiles."""
    tables, profiles, seen = [], [], {}
    for path, acts in stores.items():
        model, pert = acts.attrs.get("model"), acts.attrs.get("perturbation")
        if not model or not pert:
            raise TraitmonError(f"{path}: activation store without model and perturbation labels (store it with "
                                "--model-key and --perturbation)")
        if (model, pert) in seen:
            raise TraitmonError(f"{path}: a second activation store for model {model}, perturbation {pert} "
                                f"(the first: {seen[(model, pert)]})")
        seen[(model, pert)] = path
        if model not in directions:
            raise TraitmonError(f"{path}: no trait directions given for model '{model}'")
        result = screen_from_activations(acts, directions[model], weights, n_boot, source=str(path))
        tables.append(result.table.assign(model=model, perturbation=pert))
        profiles.append({"model": model, "perturbation": pert, **result.profile})
    table = pd.concat(tables, ignore_index=True)
    return table[["model", "perturbation"] + [c for c in table.columns if c not in ("model", "perturbation")]], profiles


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
