"""Typed settings: one frozen dataclass per config section, built from a schema-validated config.

Defaults live only in the schema (``data/config.schema.yaml``): the dataclasses have none, so a section is
built from a config whose defaults the validator has filled, or from a JSON blob that carries every key (the
rules' ``params``). A command reads its blob with ``parse_settings``: an unknown or missing key is a one-line
error naming it. The model's dtype travels next to a section under one name, ``model_dtype``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from traitmon.errors import TraitmonError

MODEL_DTYPE = "model_dtype"  # the one name of the model's dtype in every settings blob
CAPTURE_PRECISION = "capture_precision"  # capture.precision in the blobs of other sections that capture
PRECISIONS = ("fp32", "bf16")  # its values: how teacher-forced passes compute (traitmon.models.compute_precision)
GUARD_BUNDLE = "guard_bundle"  # a guarded finetune's blob: what it builds its monitor bundle from


@dataclass(frozen=True)
class ModelSettings:
    """A ``models`` entry."""

    source: dict
    dtype: str
    params_b: float


@dataclass(frozen=True)
class DirectionSettings:
    """The ``directions`` section: trait-direction extraction."""

    questions: int
    pairs_per_question: int
    max_new_tokens: int
    temperature: float
    batch_size: int
    seed: int
    heldout_fraction: float
    layer: dict  # the layer rule: {"rule": best|fixed|fraction, ...}


@dataclass(frozen=True)
class SteeringSettings:
    """The ``steering`` section."""

    coefs: tuple[float, ...]
    questions: int
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class GuardSettings:
    """``finetune.guard`` or a perturbation's ``guard``: the fitted monitor that watches a finetune and what it
    does after ``patience`` alarming checks in a row (``traitmon.callbacks.TraitMonitorCallback``)."""

    monitor: str  # a monitor.json fitted by an earlier study's analysis
    on_alarm: str  # rollback, stop or warn
    every: int
    patience: int


@dataclass(frozen=True)
class GuardBundleSettings:
    """What a guarded finetune builds its monitor bundle from, as rule ``monitor_bundle`` does: the model's trait
    directions, the capture settings and the analysis variant (the blob's ``guard_bundle``)."""

    model_key: str
    directions: tuple[str, ...]
    per_trait_questions: int
    variant: str
    batch_size: int
    precision: str = "fp32"  # capture.precision (blobs written before it existed measured in float32)


@dataclass(frozen=True)
class FinetuneSettings:
    """The ``finetune`` section: LoRA and Trainer settings."""

    rank: int
    alpha: float
    rslora: bool
    dropout: float
    target_modules: tuple[str, ...]
    lr: float
    weight_decay: float
    scheduler: str
    warmup_steps: int
    max_steps: int
    micro_batch: int
    grad_accum: int
    max_length: int
    max_grad_norm: float
    seed: int
    checkpoint_every: int
    checkpoint_steps: tuple[int, ...] | None  # optional in the schema: overrides checkpoint_every
    precision: str
    gradient_checkpointing: bool
    keep_states: bool
    guard: GuardSettings | None = None  # optional in the schema: unguarded


@dataclass(frozen=True)
class CaptureSettings:
    """The ``capture`` section; ``dtype`` is the stored activations' dtype (not the model's)."""

    per_trait_questions: int
    layers: str | tuple[int, ...]  # "all" or hidden_states indices
    reference_response: bool
    batch_size: int
    dtype: str
    precision: str  # how every capture and the directions' and screening's responses compute (compute_precision)


@dataclass(frozen=True)
class GenerationSettings:
    """``behavior.generation``: how answers are sampled (``hf`` in the job, or an OpenAI-compatible server)."""

    backend: str
    dtype: str
    concurrency: int
    timeout: float
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None


GENERATION_DEFAULT = GenerationSettings(backend="hf", dtype="bfloat16", concurrency=8, timeout=300.0)


@dataclass(frozen=True)
class BehaviorSettings:
    """The ``behavior`` section: answer sampling and the EM cut-offs."""

    samples_per_question: int
    trait_questions: int
    temperature: float
    max_new_tokens: int
    batch_size: int
    seed: int
    aligned_max: float
    coherent_min: float
    max_unscorable: float
    generation: GenerationSettings = GENERATION_DEFAULT


@dataclass(frozen=True)
class SaeSettings:
    """``analysis.sae``: the TopK SAE of the SAE-latent baseline (``layer`` None: the traits' median layer)."""

    n_latents: int
    k: int
    steps: int
    batch_size: int
    lr: float
    seed: int
    layer: int | None = None


@dataclass(frozen=True)
class AnalysisSettings:
    """The ``analysis`` section."""

    variant: str
    theta: float
    target_fnr: float
    theta_sweep: tuple[float, ...]
    persistence: int
    n_boot: int
    judge: str | None  # optional in the schema: the first judge
    sae: SaeSettings | None = None


@dataclass(frozen=True)
class JudgeSettings:
    """A ``judges`` entry; which keys a type needs is checked by the schema and ``judges.make_judge``."""

    type: str
    api_key_env: str
    concurrency: int
    timeout: float
    max_retries: int
    dtype: str
    base_url: str | None = None
    model: str | None = None
    model_dir: str | None = None
    train_path: str | None = None


@dataclass(frozen=True)
class StudySettings:
    """Every typed section of one validated config (``perturbations`` stay the schema's mappings)."""

    models: dict[str, ModelSettings]
    directions: DirectionSettings
    steering: SteeringSettings
    finetune: FinetuneSettings
    capture: CaptureSettings
    behavior: BehaviorSettings
    analysis: AnalysisSettings
    judges: dict[str, JudgeSettings]


S = TypeVar("S")
# sub-sections that are dataclasses of their own: (section class, key) -> class
NESTED = {("AnalysisSettings", "sae"): SaeSettings, ("BehaviorSettings", "generation"): GenerationSettings,
          ("FinetuneSettings", "guard"): GuardSettings}
SECTIONS = {"directions": DirectionSettings, "steering": SteeringSettings, "finetune": FinetuneSettings,
            "capture": CaptureSettings, "behavior": BehaviorSettings, "analysis": AnalysisSettings}


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build(cls: type[S], values: dict, where: str) -> S:
    """``cls`` from a mapping with exactly its fields (optional ones may be absent); else a one-line error."""
    if not isinstance(values, dict):
        raise TraitmonError(f"{where}: expected a mapping of {cls.__name__} keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TraitmonError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(fields)})")
    optional = {n for n, f in fields.items() if f.default is not dataclasses.MISSING or "None" in str(f.type)}
    missing = [n for n in fields if n not in values and n not in optional]
    if missing:
        raise TraitmonError(f"{where}: missing key '{missing[0]}'")
    values = {n: build(NESTED[cls.__name__, n], v, f"{where}.{n}") if (cls.__name__, n) in NESTED and
              isinstance(v, dict) else v for n, v in values.items()}
    # an optional key the config leaves out (no schema default) is None, or its dataclass default
    return cls(**{n: _frozen(values[n]) if n in values else None for n in fields
                  if n in values or (n in optional and fields[n].default is dataclasses.MISSING)})


def study_settings(config: dict) -> StudySettings:
    """The typed sections of a config already validated by ``traitmon.config.validate_config``."""
    return StudySettings(
        models={k: build(ModelSettings, v, f"models.{k}") for k, v in config["models"].items()},
        judges={k: build(JudgeSettings, v, f"judges.{k}") for k, v in config["judges"].items()},
        **{name: build(cls, config[name], name) for name, cls in SECTIONS.items()})


def as_dict(settings: Any) -> dict:
    """Plain JSON-able mapping of a settings dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def settings_json(settings: Any, **extra: Any) -> str:
    """The blob a rule passes as ``--settings``: the section's keys plus ``extra`` (e.g. ``model_dtype``)."""
    return json.dumps({**as_dict(settings), **extra}, sort_keys=True)


def finetune_dict(settings: FinetuneSettings) -> dict:
    """The finetune section as plain data, without ``guard`` when the run is unguarded: an unguarded run's blob
    and run identity are then exactly those of the runs made before guards existed, so they are not rerun."""
    values = as_dict(settings)
    if values.get("guard") is None:
        values.pop("guard", None)
    return values


def finetune_json(settings: FinetuneSettings, **extra: Any) -> str:
    """The finetune rule's ``--settings`` blob (``settings_json`` less an unset ``guard``)."""
    return json.dumps({**finetune_dict(settings), **extra}, sort_keys=True)


def parse_settings(text: str, cls: type[S], *extra: str, flag: str = "--settings",
                   optional: tuple[str, ...] = ()) -> tuple[S, dict]:
    """Parse a ``--settings`` blob into ``cls``; return it with the ``extra`` keys it must also carry and the
    ``optional`` ones it does carry."""
    from traitmon.io import parse_jsonl_line  # the one "a JSON object, or a one-line error" parser

    values = parse_jsonl_line(text, flag)
    missing = [k for k in extra if k not in values]
    if missing:
        raise TraitmonError(f"{flag}: missing key '{missing[0]}'")
    others = set(extra) | set(optional)
    return (build(cls, {k: v for k, v in values.items() if k not in others}, flag),
            {k: values[k] for k in (*extra, *optional) if k in values})


@functools.cache
def _schema() -> dict:
    from traitmon.config import load_schema

    return load_schema()


def section_defaults(section: str) -> dict:
    """The schema's defaults of one section (what a command uses when no ``--settings`` is given), nested
    sub-sections (``behavior.generation``) filled with their own defaults."""
    return _defaults(_schema()["properties"][section])


def _defaults(schema: dict) -> dict:
    out = {}
    for name, sub in schema.get("properties", {}).items():
        if "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
            if isinstance(out[name], dict) and "properties" in sub:
                out[name] = {**_defaults(sub), **out[name]}
    return out


def schema_default(section: str, key: str) -> Any:
    """One default of the schema, for a command-line option that mirrors a config key."""
    return section_defaults(section)[key]


def judge_defaults() -> dict:
    """The schema's defaults of a ``judges`` entry (for a judge given on the command line)."""
    props = _schema()["properties"]["judges"]["additionalProperties"]["properties"]
    return copy.deepcopy({name: sub["default"] for name, sub in props.items() if "default" in sub})


def model_dtype_default() -> str:
    return _schema()["properties"]["models"]["additionalProperties"]["properties"]["dtype"]["default"]
