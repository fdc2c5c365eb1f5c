"""``traitmon`` command line: thin wrappers over library functions, used by the workflow rules and by users.

Every subcommand takes explicit paths and a JSON ``--settings`` blob (the rule's ``params``), so a rule's
output depends only on what Snakemake can see.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from traitmon.errors import TraitmonError
from traitmon.settings import (
    CAPTURE_PRECISION,
    GUARD_BUNDLE,
    MODEL_DTYPE,
    PRECISIONS,
    AnalysisSettings,
    BehaviorSettings,
    CaptureSettings,
    DirectionSettings,
    FinetuneSettings,
    GuardBundleSettings,
    SteeringSettings,
    build,
    model_dtype_default,
    parse_settings,
    schema_default,
    section_defaults,
)

log = logging.getLogger("traitmon")


# ---- command registry: each command's options live next to it; options shared by many are defined once ----
SHARED_OPTIONS: dict[str, tuple[str, dict]] = {
    "model_dir": ("--model-dir", {"required": True, "help": "the converted base model folder"}),
    "model_key": ("--model-key", {"required": True, "help": "the model's name in the config"}),
    "settings": ("--settings", {"required": True, "help": "JSON: the config section the command reads (its rule's params)"}),
    "threads": ("--threads", {"type": int, "help": "torch CPU threads (default: torch's choice)"}),
}
COMMANDS: dict[str, tuple[str, Callable, Callable, list[argparse.ArgumentParser]]] = {}


def shared_option(name: str, **changes) -> argparse.ArgumentParser:
    """A parent parser holding one shared option, with a command's own help text or ``required``."""
    flag, kwargs = SHARED_OPTIONS[name]
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(flag, **{**kwargs, **changes})
    return parent


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None], *shared: str,
            **shared_changed: dict) -> Callable:
    """Register a ``cmd_*`` function as subcommand ``name``: its own options, then the shared ones it uses
    (by name, or by name with changed help / required)."""
    parents = [shared_option(n) for n in shared] + [shared_option(n, **c) for n, c in shared_changed.items()]

    def register(func: Callable) -> Callable:
        COMMANDS[name] = (help, func, add_arguments, parents)
        return func

    return register


def _settings(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraitmonError(f"--settings is not valid JSON: {exc}") from None


def _precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default=schema_default("capture", "precision"), choices=("auto", *PRECISIONS),
                   help="the config's capture.precision: bf16 runs the passes under bfloat16 autocast, auto "
                        "where this machine computes bf16 natively")


def _precision(extra: dict) -> str:
    """capture.precision as a blob of another section carries it (blobs from before it existed: the default)."""
    return extra.get(CAPTURE_PRECISION, schema_default("capture", "precision"))


def _set_threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _validate_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    p.add_argument("--show", action="store_true", help="print the config with defaults")


@command("validate-config", "check a config against the schema (defaults filled)", _validate_config_args)
def cmd_validate_config(args) -> None:
    from traitmon.config import load_config

    config = load_config(args.config)
    print(json.dumps(config, indent=2) if args.show else f"{args.config}: valid")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", required=True)
    p.add_argument("--source", required=True, help="JSON model source, as in config.yaml")
    p.add_argument("--dtype", default="auto", help="storage dtype: auto (float32), bfloat16 or float16")
    p.add_argument("--out", required=True)


@command("convert", "materialise a model source as a safetensors folder", _convert_args)
def cmd_convert(args) -> None:
    from traitmon.models import convert_model

    convert_model(args.key, _settings(args.source), args.out, args.dtype)


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trait-file", required=True)
    p.add_argument("--out", required=True, help="Zarr store")
    p.add_argument("--responses", required=True, help="JSONL of generated responses")


@command("extract", "extract one trait's directions from one model",
         _extract_args, "model_dir", "model_key", "threads", "settings")
def cmd_extract(args) -> None:
    from traitmon.directions import extract_trait_direction
    from traitmon.io import write_jsonl
    from traitmon.models import load_model
    from traitmon.store import write_dataset
    from traitmon.traits import load_trait

    _set_threads(args.threads)
    settings, extra = parse_settings(args.settings, DirectionSettings, MODEL_DTYPE, optional=(CAPTURE_PRECISION,))
    trait = load_trait(args.trait_file)
    model, tok = load_model(args.model_dir, extra[MODEL_DTYPE])
    ds, rows = extract_trait_direction(model, tok, trait, settings, args.model_key, _precision(extra))
    write_jsonl(args.responses, rows)
    write_dataset(ds, args.out)
    log.info("%s/%s: chosen layer %s (on the selection questions), held-out AUROC %.3f; NaN pairs dropped: "
             "%d selection, %d held-out", args.model_key, trait.name, ds.attrs["chosen_layer"],
             float(ds.separation.sel(layer=ds.attrs["chosen_layer"])), ds.attrs["dropped_pairs_selection"],
             ds.attrs["dropped_pairs_heldout"])


def _steer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--direction", required=True)
    p.add_argument("--trait-file", required=True)
    p.add_argument("--out", required=True)


@command("steer", "steering check of one trait direction", _steer_args, "model_dir", "threads", "settings")
def cmd_steer(args) -> None:
    from traitmon.io import write_csv
    from traitmon.models import load_model
    from traitmon.steering import steering_check
    from traitmon.store import open_dataset
    from traitmon.traits import load_trait

    _set_threads(args.threads)
    settings, extra = parse_settings(args.settings, SteeringSettings, MODEL_DTYPE, "seed",
                                     optional=(CAPTURE_PRECISION,))
    model, tok = load_model(args.model_dir, extra[MODEL_DTYPE])
    table = steering_check(model, tok, open_dataset(args.direction, load=True), load_trait(args.trait_file),
                           settings, extra["seed"], _precision(extra))
    write_csv(args.out, table)


def _summarize_directions_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--directions", nargs="+", required=True)
    p.add_argument("--steering", nargs="+", required=True)
    p.add_argument("--summary", required=True)
    p.add_argument("--cosines", required=True)
    p.add_argument("--figure", required=True, help="separation-by-layer PNG")
    p.add_argument("--cosine-figure", required=True, help="cosine heat map PNG")


@command("summarize-directions", "per-model table, cosine matrix and separation figure",
         _summarize_directions_args)
def cmd_summarize_directions(args) -> None:
    from traitmon.io import write_csv
    from traitmon.plots import save
    from traitmon.report import summarize_directions

    out = summarize_directions(args.directions, args.steering)
    write_csv(args.summary, out.summary)
    write_csv(args.cosines, out.cosines)
    save(out.figure, args.figure)
    save(out.cosine_figure, args.cosine_figure)


def _perturbation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", required=True)
    p.add_argument("--spec", required=True, help="JSON: the perturbation's config entry")
    p.add_argument("--train", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--meta", required=True)


@command("perturbation", "build one perturbation's train / held-out chat JSONL",
         _perturbation_args, "threads", model_dir={"help": "needed for generator mode 'self'", "required": False})
def cmd_perturbation(args) -> None:
    from traitmon.io import write_json, write_jsonl
    from traitmon.perturbations import build_perturbation

    spec = _settings(args.spec)
    model = tok = None
    if spec.get("generator", {}).get("mode") == "self":
        from traitmon.models import load_model

        _set_threads(args.threads)
        model, tok = load_model(args.model_dir)
    train, heldout, meta = build_perturbation(args.key, spec, model, tok)
    write_jsonl(args.train, train)
    write_jsonl(args.heldout, heldout)
    write_json(args.meta, meta)


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True)
    p.add_argument("--heldout", required=True)
    p.add_argument("--out", required=True)


@command("finetune", "LoRA finetune with checkpoints (resumes after a kill)",
         _finetune_args, "model_dir", "threads", "settings")
def cmd_finetune(args) -> None:
    import yaml

    from traitmon.finetune import finetune
    from traitmon.io import data_path
    from traitmon.perturbations import read_rows

    _set_threads(args.threads)
    settings, extra = parse_settings(args.settings, FinetuneSettings, MODEL_DTYPE, optional=(GUARD_BUNDLE,))
    train, heldout = read_rows(args.train), read_rows(args.heldout)  # bad rows fail before the guard's bundle
    general = yaml.safe_load(data_path("prompts", "general_text.yaml").read_text())["chats"]
    finetune(args.model_dir, train, heldout, general, settings, args.out, extra[MODEL_DTYPE],
             guard=_guard(args.model_dir, settings, extra))


def _guard(model_dir: str, settings: FinetuneSettings, extra: dict):
    """The finetune's guard when its settings have one; it needs the blob's ``guard_bundle`` to build its bundle."""
    from traitmon.guard import make_guard

    if (settings.guard is None) != (GUARD_BUNDLE not in extra):
        raise TraitmonError(f"--settings: 'guard' and '{GUARD_BUNDLE}' go together (the guard's monitor, and the "
                            "directions, trait files and capture settings its bundle is built from)")
    if settings.guard is None:
        return None
    inputs = build(GuardBundleSettings, extra[GUARD_BUNDLE], f"--settings: {GUARD_BUNDLE}")
    return make_guard(model_dir, settings.guard, inputs, extra[MODEL_DTYPE])


def _capture_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="peft adapter folder (omit for the base model)")
    p.add_argument("--out", required=True)
    p.add_argument("--perturbation")
    p.add_argument("--step", type=int, default=0)


@command("capture", "capture the measurement prompts on a model or adapter into Zarr",
         _capture_args, "model_key", "threads", "model_dir", "settings")
def cmd_capture(args) -> None:
    from traitmon.models import load_model
    from traitmon.store import write_dataset

    _set_threads(args.threads)
    settings, extra = parse_settings(args.settings, CaptureSettings, MODEL_DTYPE)
    model, tok = load_model(args.model_dir, extra[MODEL_DTYPE], adapter=args.adapter)
    write_dataset(_measurement_capture(args, settings, model, tok), args.out)


def _measurement_capture(args, settings: CaptureSettings, model, tok):
    """The measurement set captured on ``model`` (the base with ``args.adapter`` applied), with its attrs."""
    from traitmon import __version__
    from traitmon.capture import capture_dataset, measurement_prompts, measurement_version
    from traitmon.io import file_hash

    ids, chats, reference = measurement_prompts(settings.per_trait_questions)
    adapter_hash = file_hash(f"{args.adapter}/adapter_model.safetensors") if args.adapter else "none"
    attrs = {"model": args.model_key, "perturbation": args.perturbation or "", "step": args.step,
             "adapter": str(args.adapter or ""), "adapter_hash": adapter_hash, "traitmon_version": __version__,
             "measurement_set": measurement_version(),
             "label": f"capture {args.perturbation or 'base'} step {args.step}"}
    layers = None if settings.layers == "all" else list(settings.layers)
    if layers is not None:
        from traitmon.config import check_layers
        from traitmon.hooks import num_layers

        check_layers(layers, num_layers(model))
    return capture_dataset(model, tok, ids, chats, reference if settings.reference_response else None, layers,
                           settings.batch_size, settings.dtype, attrs, settings.precision)


def _sampling_settings(text: str, flag: str = "--settings") -> tuple[BehaviorSettings, dict]:
    """The behavior section for the sampling commands: the rules pass only the keys sampling reads (so a judging
    cut-off edit does not re-sample); the rest are the schema's defaults. Returns it with the model's dtype."""
    from traitmon.io import parse_jsonl_line

    values = parse_jsonl_line(text, flag)
    if MODEL_DTYPE not in values:
        raise TraitmonError(f"{flag}: missing key '{MODEL_DTYPE}'")
    return _resolve_sampling_dtype(_behavior_from(values, flag)), {MODEL_DTYPE: values[MODEL_DTYPE]}


def _resolve_sampling_dtype(settings: BehaviorSettings) -> BehaviorSettings:
    """``generation.dtype`` auto as the precision resolver answers here (bfloat16 where it is native, else
    float32), so the answers' cache keys name the dtype that ran; a server's dtype is its own business."""
    import dataclasses

    from traitmon.models import resolve_device
    from traitmon.precision import resolve_dtype

    if settings.generation.backend != "hf":
        return settings
    dtype = resolve_dtype(settings.generation.dtype, resolve_device(None), "sampling")
    return dataclasses.replace(settings, generation=dataclasses.replace(settings.generation, dtype=dtype))


def _behavior_settings(text: str | None) -> BehaviorSettings:
    """The behavior section for the judging commands: the schema's defaults under the keys a blob gives (the
    EM cut-offs, say); the rules' blob also carries the model's dtype (it is shared with ``answers``)."""
    return _behavior_from(_settings(text) if text else {}, "--settings")


def _behavior_from(values: dict, flag: str) -> BehaviorSettings:
    """The schema's behavior defaults under ``values`` (its ``model_dtype``, if any, left out)."""
    values = {k: v for k, v in values.items() if k != MODEL_DTYPE}
    return build(BehaviorSettings, {**section_defaults("behavior"), **values}, flag)


def _judge_and_cache(args):
    from traitmon.judges import JudgementCache, make_judge

    spec = _settings(args.judge_spec) if args.judge_spec else {}
    spec.setdefault("type", args.judge)
    return make_judge(spec), JudgementCache(args.cache)


def _answers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter")
    p.add_argument("--out", required=True)
    p.add_argument("--perturbation", default="base", help="the run's perturbation ('base' for the base model)")
    p.add_argument("--step", type=int, default=0, help="the run's checkpoint step (0 for the base model)")
    p.add_argument("--label")


@command("answers", "sample answers to the EM questions at one checkpoint (or the base model)",
         _answers_args, "model_dir", "threads", "settings", "model_key")
def cmd_answers(args) -> None:
    from traitmon.io import write_jsonl

    _set_threads(args.threads)
    settings, extra = _sampling_settings(args.settings)
    write_jsonl(args.out, _em_answers(args, settings, extra))


def _em_answers(args, settings: BehaviorSettings, extra: dict, loaded: tuple | None = None) -> list[dict]:
    """The EM answers of ``args``' run: through the configured server, else on ``loaded`` (model, tokenizer: the
    base with ``args.adapter`` applied, at the sampling dtype) or a model loaded for it."""
    run = {"model": args.model_key, "perturbation": args.perturbation or "base", "step": args.step}
    if settings.generation.backend == "server":
        from traitmon.behavior import sample_answers_server

        return sample_answers_server(settings, run, adapter=args.adapter)
    from traitmon.behavior import sample_answers

    model, tok = loaded or _answer_model(args.model_dir, settings, extra, args.adapter)
    return sample_answers(model, tok, settings, run, label=args.label or "")


def _measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="peft adapter folder (omit for the base model)")
    p.add_argument("--perturbation", help="the run's perturbation (omit for the base model)")
    p.add_argument("--step", type=int, default=0, help="the run's checkpoint step (0 for the base model)")
    p.add_argument("--capture-settings", required=True, help="the capture section as JSON, with model_dtype")
    p.add_argument("--answer-settings", required=True, help="what EM answer sampling reads, as JSON, with model_dtype")
    p.add_argument("--capture-out", required=True)
    p.add_argument("--answers-out", required=True)
    p.add_argument("--label")


@command("measure", "capture the measurement prompts and sample the EM answers of one checkpoint (or the base "
         "model) in one process", _measure_args, "model_key", "threads", "model_dir")
def cmd_measure(args) -> None:
    """``capture`` then ``answers`` with one start-up: the same outputs, the model loaded once when both stages
    compute at the same dtype (on CPU capture keeps float32 weights and sampling uses bfloat16, so it is loaded
    again for sampling: still less than a second process)."""
    from traitmon.io import write_jsonl
    from traitmon.models import load_model, resolve_device, resolve_dtype
    from traitmon.store import write_dataset

    _set_threads(args.threads)
    capture_settings, capture_extra = parse_settings(args.capture_settings, CaptureSettings, MODEL_DTYPE,
                                                     flag="--capture-settings")
    sampling, sampling_extra = _sampling_settings(args.answer_settings, flag="--answer-settings")
    model, tok = load_model(args.model_dir, capture_extra[MODEL_DTYPE], adapter=args.adapter)
    write_dataset(_measurement_capture(args, capture_settings, model, tok), args.capture_out)
    device = resolve_device(None)
    shared = sampling.generation.backend == "hf" and resolve_dtype(
        _sampling_dtype(sampling, sampling_extra), device) == resolve_dtype(capture_extra[MODEL_DTYPE], device)
    loaded = (model, tok) if shared else None
    if not shared:  # a server samples, or the sampling dtype loads another copy: free this one first
        del model
        _release_memory(device)
    write_jsonl(args.answers_out, _em_answers(args, sampling, sampling_extra, loaded))


def _release_memory(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sampling_dtype(settings: BehaviorSettings, extra: dict) -> str:
    dtype = settings.generation.dtype  # resolved by _sampling_settings; auto only for a server
    return extra[MODEL_DTYPE] if dtype == "auto" else dtype


def _answer_model(model_dir: str, settings: BehaviorSettings, extra: dict, adapter: str | None = None):
    from traitmon.models import load_model

    return load_model(model_dir, _sampling_dtype(settings, extra), adapter=adapter)


def _trait_answers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trait-file", nargs="+", required=True)
    p.add_argument("--runs", nargs="+", required=True,
                   help="PERTURBATION:STEP=ADAPTER per checkpoint, and base:0 (no adapter) for the base model")
    p.add_argument("--cache", required=True, help="folder of each checkpoint's sampled trait answers, reused across edits")
    p.add_argument("--out", required=True)


@command("trait-answers", "sample trait-expression answers at every checkpoint (base model loaded once)",
         _trait_answers_args, "model_dir", "threads", "settings", "model_key")
def cmd_trait_answers(args) -> None:
    from traitmon.behavior import sample_trait_answers
    from traitmon.io import write_jsonl
    from traitmon.traits import load_trait

    _set_threads(args.threads)
    settings, extra = _sampling_settings(args.settings)
    traits = {t.name: t for t in map(load_trait, args.trait_file)}
    runs = [_trait_run(spec, args.model_key) for spec in args.runs]
    server = settings.generation.backend == "server"
    model, tok = (None, None) if server else _answer_model(args.model_dir, settings, extra)
    write_jsonl(args.out, sample_trait_answers(model, tok, traits, settings, runs, args.cache))


def _trait_run(spec: str, model_key: str) -> tuple[dict, str | None]:
    # PERTURBATION:STEP=ADAPTER, or base:0
    head, _, adapter = spec.partition("=")
    perturbation, _, step = head.partition(":")
    if not step.isdigit() or (perturbation != "base") != bool(adapter):
        raise TraitmonError(f"--runs: '{spec}' is not PERTURBATION:STEP=ADAPTER (or base:0)")
    return {"model": model_key, "perturbation": perturbation, "step": int(step)}, adapter or None


def _judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", default="embedded", help="embedded (default, offline), openai or hf")
    p.add_argument("--judge-spec", help="JSON judge options, as a config judges entry")
    p.add_argument("--input", required=True, help="JSONL with question and answer fields")
    p.add_argument("--output", required=True)
    p.add_argument("--trait-file", nargs="*", help="trait files, to score rows of kind trait:NAME")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "traitmon" / "judgements"),
                   help="judgement cache folder (append-only shards; safe on network storage)")
    p.add_argument("--summary", help="also write the EM summary JSON here")


@command("judge", "score answers (question, answer rows) for aligned and coherent",
         _judge_args, "threads", settings={"required": False})
def cmd_judge(args) -> None:
    from traitmon.behavior import check_scorable, judge_answers, summarize
    from traitmon.io import read_jsonl, write_json, write_jsonl
    from traitmon.traits import load_trait

    _set_threads(args.threads)
    rows = read_jsonl(args.input)
    for n, row in enumerate(rows, start=1):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise TraitmonError(f"{args.input}:{n}: rows need string fields 'question' and 'answer'")
        row.setdefault("kind", "em")
    settings = _behavior_settings(args.settings)
    traits = {t.name: t for t in map(load_trait, args.trait_file or [])}
    judge, cache = _judge_and_cache(args)
    judged, calls = judge_answers(rows, judge, cache, traits)
    log.info("judged %d rows with %s (%d new judgements, the rest cached)", len(rows), judge.identity, calls)
    check_scorable(judged, settings.max_unscorable, judge.identity)
    write_jsonl(args.output, judged)
    if args.summary:
        write_json(args.summary, {"judge": judge.identity,
                                  **summarize(judged, settings.aligned_max, settings.coherent_min)})


def _judge_runs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judge", default="embedded")
    p.add_argument("--judge-spec", help="JSON judge options, as a config judges entry")
    p.add_argument("--judge-name", required=True, help="the judge's name in the config; written into every row")
    p.add_argument("--answers", nargs="+", required=True,
                   help="answers JSONL files; every row carries its run (model, perturbation, step)")
    p.add_argument("--kinds", required=True, help='JSON {"perturbation": "em" or "benign"}')
    p.add_argument("--trait-file", nargs="+", required=True)
    p.add_argument("--cache", required=True, help="judgement cache folder")
    p.add_argument("--judged", required=True, help="JSONL of every judged answer")
    p.add_argument("--table", required=True)
    p.add_argument("--figure", required=True)


@command("judge-runs", "judge every run's answers of a model; EM table and figure",
         _judge_runs_args, "threads", "settings")
def cmd_judge_runs(args) -> None:
    from traitmon.behavior import check_scorable, judge_answers, run_of, summarize
    from traitmon.io import read_jsonl, write_jsonl
    from traitmon.report import behavior_table
    from traitmon.traits import load_trait

    _set_threads(args.threads)
    settings = _behavior_settings(args.settings)
    traits = {t.name: t for t in map(load_trait, args.trait_file)}
    judge, cache = _judge_and_cache(args)
    judged_all, calls = [], 0
    for path in args.answers:
        rows = read_jsonl(path)
        for n, row in enumerate(rows, start=1):
            run_of(row, f"{path}:{n}")
        judged, made = judge_answers(rows, judge, cache, traits)
        calls += made
        judged_all += [{"judge": args.judge_name, **row} for row in judged]
    log.info("judged %d answers from %d files with %s: %d new judgements", len(judged_all), len(args.answers),
             judge.identity, calls)
    check_scorable(judged_all, settings.max_unscorable, judge.identity)
    by_run: dict[tuple, list[dict]] = {}
    for row in judged_all:
        by_run.setdefault(run_of(row, args.judged), []).append(row)
    summaries = [{"judge": judge.identity, **summarize(rows, settings.aligned_max, settings.coherent_min)}
                 for rows in by_run.values()]
    write_jsonl(args.judged, judged_all)
    kinds = _settings(args.kinds)
    # behavior_table (report.py) still takes run labels; they are built here from the rows, never parsed from paths
    behavior_table(summaries, [f"{m}:{p}:{s}" for m, p, s in by_run], kinds, args.table, args.figure)


def _drift_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--captures", nargs="+", required=True,
                   help="the model's capture stores (base and every checkpoint; placed by their attrs)")
    p.add_argument("--directions", nargs="+", required=True)
    p.add_argument("--behavior", required=True, help="em_scores.csv of the primary judge")
    p.add_argument("--eval-logs", nargs="+", required=True, help="PERTURBATION=eval_log.csv per perturbation")
    p.add_argument("--kinds", nargs="+", required=True, help="PERTURBATION:KIND (em or benign)")
    p.add_argument("--variant", default=schema_default("analysis", "variant"), choices=["response_mean", "last_prompt"])
    p.add_argument("--table", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--raw", required=True)
    p.add_argument("--random", required=True)
    p.add_argument("--domains", nargs="*", help="PERTURBATION:DOMAIN (leave-one-domain-out groups)")
    p.add_argument("--styles", nargs="*", help="PERTURBATION:STYLE (run metadata for the report)")
    p.add_argument("--sae", help="TopK SAE (safetensors, JSON beside it) for the SAE-latent baseline")
    p.add_argument("--sae-drift", help="output: SAE latent-change store")


@command("drift", "drift profiles, raw drift and random-direction drift of one model", _drift_args, "threads")
def cmd_drift(args) -> None:
    from traitmon.drift import build_drift_table
    from traitmon.io import write_csv
    from traitmon.store import write_dataset

    _set_threads(args.threads)
    eval_logs = _pairs(args.eval_logs, "=", "--eval-logs", "PERTURBATION=PATH")
    kinds = _pairs(args.kinds, ":", "--kinds", "PERTURBATION:KIND")
    domains = _pairs(args.domains or [], ":", "--domains", "PERTURBATION:DOMAIN")
    styles = _pairs(args.styles or [], ":", "--styles", "PERTURBATION:STYLE")
    if bool(args.sae) != bool(args.sae_drift):
        raise TraitmonError("--sae and --sae-drift go together (the SAE in, its latent-change store out)")
    sae = None
    if args.sae:
        from traitmon.sae import TopKSAE

        sae = TopKSAE.load(args.sae)
    out = build_drift_table(args.captures, args.directions, args.behavior, eval_logs, kinds, args.variant,
                            domains=domains, styles=styles, sae=sae)
    write_csv(args.table, out["table"])
    write_dataset(out["drift"].astype("float32"), args.store)
    write_dataset(out["raw"].astype("float32"), args.raw)
    write_csv(args.random, out["random"])
    if sae is not None:
        write_dataset(out["sae"], args.sae_drift)


def _train_sae_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--capture", required=True, help="the base model's capture store")
    p.add_argument("--directions", nargs="*", help="trait directions (the layer: their median chosen layer)")
    p.add_argument("--layer", type=int, help="hidden_states layer (default: the traits' median chosen layer)")
    p.add_argument("--out", required=True, help="SAE .safetensors (its .json is written beside it)")


@command("train-sae", "train a TopK SAE on a base capture store at one layer", _train_sae_args, "threads",
         model_key={"required": False, "default": ""},
         settings={"required": False, "default": "{}", "help": "JSON: n_latents, k, steps, batch_size, lr, seed"})
def cmd_train_sae(args) -> None:
    from traitmon.drift import sae_training_rows, trait_layer
    from traitmon.sae import fit_topk_sae

    _set_threads(args.threads)
    if args.layer is None and not args.directions:
        raise TraitmonError("train-sae: give --layer or the --directions whose median chosen layer it is")
    layer = args.layer if args.layer is not None else trait_layer(args.directions)
    settings = _settings(args.settings)
    sae = fit_topk_sae(sae_training_rows(args.capture, layer), **settings)
    sae.info.update(layer=layer, model=args.model_key, source="trained by traitmon on the base capture")
    sae.save(args.out)


def _pairs(items: list[str], sep: str, flag: str, form: str) -> dict[str, str]:
    bad = [item for item in items if sep not in item]
    if bad:
        raise TraitmonError(f"{flag}: {bad[0]!r} is not of the form {form}")
    return dict(item.split(sep, 1) for item in items)


ANALYSIS_TABLES = {"drift": "drift_table", "correlations": "correlations", "baselines": "baselines",
                   "early_warning": "early_warning", "theta_sweep": "theta_sweep_table", "verdict": "verdict",
                   "controls_match": "controls_match"}
ANALYSIS_FIGURES = {"drift_trajectories": "figure_drift", "pc1_loadings": "figure_loadings",
                    "pc1_vs_em": "figure_scatter", "roc_curves": "figure_roc", "em_and_alarms": "figure_alarms",
                    "comparison": "figure_comparison", "verdict": "figure_verdict",
                    "lead_distribution": "figure_lead", "raw_drift_norm": "figure_raw_norm"}


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drift", nargs="+", required=True, help="per-model drift.csv")
    p.add_argument("--raw", nargs="+", required=True, help="per-model raw_drift.zarr")
    p.add_argument("--random", nargs="+", required=True, help="per-model random_drift.csv")
    p.add_argument("--sae-drift", nargs="*", help="per-model SAE latent-change stores (the SAE baseline)")
    p.add_argument("--theta", type=float, default=schema_default("analysis", "theta"))
    p.add_argument("--target-fnr", type=float, default=schema_default("analysis", "target_fnr"))
    p.add_argument("--theta-sweep", nargs="+", type=float, default=schema_default("analysis", "theta_sweep"))
    p.add_argument("--persistence", type=int, default=schema_default("analysis", "persistence"), help="consecutive checkpoints for an alarm / crossover")
    p.add_argument("--n-boot", type=int, default=schema_default("analysis", "n_boot"), help="run-bootstrap resamples for the intervals")
    for flag, what in [("metrics", "metrics.json"), ("predictions", "predictions.csv"), ("monitor", "monitor.json"),
                       ("axis", "em_axis.json"), *[(f, f"{n} CSV") for n, f in ANALYSIS_TABLES.items()],
                       *[(f, f"{n} PNG") for n, f in ANALYSIS_FIGURES.items()]]:
        p.add_argument(f"--{flag.replace('_', '-')}", required=True, help=what)


@command("analyze", "EM axis, monitor (LOPO), baselines with intervals, early warning, figures",
         _analyze_args)
def cmd_analyze(args) -> None:
    from traitmon.analysis import read_inputs, run_analysis
    from traitmon.io import write_csv, write_json
    from traitmon.plots import save

    table, raw, random_tables, sae = read_inputs(args.drift, args.raw, args.random, args.sae_drift)
    settings = AnalysisSettings(variant=schema_default("analysis", "variant"), theta=args.theta,
                                target_fnr=args.target_fnr, theta_sweep=tuple(args.theta_sweep),
                                persistence=args.persistence, n_boot=args.n_boot, judge=None)
    result = run_analysis(table, raw, random_tables, settings, source=" + ".join(args.drift), sae=sae)
    for name, flag in ANALYSIS_TABLES.items():
        write_csv(getattr(args, flag), result.tables[name])
    write_csv(args.predictions, result.tables["predictions"][PREDICTION_COLUMNS])
    write_json(args.metrics, result.documents["metrics"])
    write_json(args.axis, result.documents["axis"])
    result.monitor.save(args.monitor)
    for name, flag in ANALYSIS_FIGURES.items():
        save(result.figures[name], getattr(args, flag))


def _monitor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["evaluate", "apply"], default="evaluate")
    p.add_argument("--table", help="CSV with model, perturbation, step, em_rate and drift_* columns")
    p.add_argument("--out", help="evaluate: output folder; apply: output CSV")
    p.add_argument("--theta", type=float, default=schema_default("analysis", "theta"), help="EM rate at which a checkpoint is dangerous")
    p.add_argument("--target-fnr", type=float, default=schema_default("analysis", "target_fnr"))
    p.add_argument("--save-monitor", help="also fit on every checkpoint row and save the monitor here (JSON)")
    p.add_argument("--monitor", help="apply: a saved monitor (monitor.json)")


@command("monitor", "evaluate the EM monitor leave-one-perturbation-out, or apply a saved one", _monitor_args)
def cmd_monitor(args) -> None:

    from traitmon.io import write_csv, write_json
    from traitmon.monitor import candidates, checkpoint_rows, evaluate_lopo, fit_monitor, validate_table
    from traitmon.stats import compare_methods

    if args.action == "apply":
        _monitor_apply(args)
        return
    if not args.table or not args.out:
        raise TraitmonError("traitmon monitor needs --table and --out")
    table = _read_table(args.table)
    features = validate_table(table, args.table)
    metrics, preds = evaluate_lopo(table, features, args.theta, args.target_fnr)
    metrics["intervals"] = compare_methods({"trait monitor": preds}, "trait monitor")["methods"]["trait monitor"]
    out = Path(args.out)
    write_json(out / "metrics.json", metrics)
    write_csv(out / "predictions.csv", preds[PREDICTION_COLUMNS])
    if args.save_monitor:
        rows = checkpoint_rows(table)
        fit_monitor(rows[features].to_numpy(float), rows.em_rate.to_numpy(float), rows.perturbation.to_numpy(),
                    args.theta, args.target_fnr, candidates(), features).save(args.save_monitor)
    print(f"AUROC {metrics['auroc']:.3f}  FNR {metrics['fnr']:.3f}  FPR {metrics['fpr']:.3f}  "
          f"(theta {args.theta}, {len(metrics['folds'])} LOPO folds, {metrics['n_uncertain']} uncertain labels)")


PREDICTION_COLUMNS = ["model", "perturbation", "step", "score", "alarm", "dangerous", "uncertain"]


def _read_table(path: str):
    import pandas as pd

    try:
        return pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise TraitmonError(f"{path}: cannot read CSV table ({exc})") from None


def _monitor_apply(args) -> None:
    from traitmon.io import write_csv
    from traitmon.monitor import FittedMonitor

    if not args.monitor or not args.table or not args.out:
        raise TraitmonError("traitmon monitor apply needs --monitor (a monitor.json), --table and --out")
    monitor = FittedMonitor.load(args.monitor)
    table = _read_table(args.table)
    out = table[[c for c in ("model", "perturbation", "step") if c in table]].copy()
    out["score"] = monitor.score(table, args.table)
    out["alarm"] = out.score >= monitor.threshold
    write_csv(args.out, out)


def _bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--directions", nargs="+", required=True)
    p.add_argument("--per-trait-questions", type=int, default=schema_default("capture", "per_trait_questions"))
    p.add_argument("--variant", default=schema_default("analysis", "variant"), choices=["response_mean", "last_prompt"])
    p.add_argument("--monitor", help="a saved monitor (JSON, from `traitmon monitor --save-monitor`)")
    p.add_argument("--dtype", default=model_dtype_default(), choices=["auto", "float32", "bfloat16", "float16"],
                   help="the model's dtype in the config; the bundle loads the base in it to score")
    p.add_argument("--batch-size", type=int, default=schema_default("capture", "batch_size"), help="the config's capture batch size")
    _precision_arg(p)
    p.add_argument("--out", required=True, help="the bundle folder to write")


@command("bundle", "save a monitor bundle folder (directions, base reference, prompts, monitor)",
         _bundle_args, "model_dir", "model_key", "threads")
def cmd_bundle(args) -> None:
    from traitmon.bundle import build_bundle
    from traitmon.models import load_model

    _set_threads(args.threads)
    model, tok = load_model(args.model_dir, args.dtype)
    bundle = build_bundle(model, tok, args.model_key, args.directions, args.per_trait_questions, args.variant,
                          args.monitor, args.batch_size, args.dtype, args.precision)
    bundle.save(args.out)


def _watch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--bundle", required=True, help="a bundle folder from `traitmon bundle`")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="load the base in this dtype (default: the bundle's)")
    p.add_argument("--once", action="store_true", help="score what is there and exit")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    p.add_argument("--timeout", type=float, help="stop polling after this many seconds")
    p.add_argument("--max-checkpoints", type=int, help="stop once this many checkpoints are scored")
    p.add_argument("--on-alarm", default="warn", choices=["warn", "stop", "rollback"],
                   help="stop/rollback: after --patience alarming checkpoints in a row, write traitmon-stop.json "
                        "(rollback: and copy the last safe checkpoint to checkpoint-safe) and exit with status 3")
    p.add_argument("--patience", type=int, default=1, help="consecutive alarming checkpoints before acting")


@command("watch", "score peft checkpoints as they appear in a run folder",
         _watch_args, "threads", "model_dir")
def cmd_watch(args) -> int:
    from traitmon.bundle import MonitorBundle
    from traitmon.models import load_model
    from traitmon.watcher import ALARM_EXIT, watch

    _set_threads(args.threads)
    if not Path(args.run_dir).is_dir():  # before loading anything: a watcher of nothing must not look quiet
        raise TraitmonError(f"{args.run_dir}: no such run folder")
    bundle = MonitorBundle.load(args.bundle)
    base, _ = load_model(args.model_dir, args.dtype or bundle.model_dtype)
    bundle.check_model(base, args.bundle)
    del base
    results = watch(args.run_dir, args.model_dir, bundle, once=args.once, interval=args.interval,
                    timeout=args.timeout, dtype=args.dtype, max_checkpoints=args.max_checkpoints,
                    printer=lambda line: print(line, flush=True), on_alarm=args.on_alarm, patience=args.patience)
    return ALARM_EXIT if results and "stop_request" in results[-1] else 0


def _screen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="chat JSONL (rows of 'messages' ending with the assistant answer)")
    p.add_argument("--directions", nargs="+", help="the model's trait direction stores (directions/MODEL/*.zarr)")
    p.add_argument("--out-dir", help="folder for rows.csv, profile.json and the cached base answers")
    p.add_argument("--activations-out", metavar="STORE",
                   help="write the trait-independent activation store (Zarr, (answer, row, layer, hidden)) of the "
                        "rows' answers and the base model's own answers; needs no --directions; the own answers are "
                        "cached beside it unless --out-dir is given")
    p.add_argument("--activations", metavar="STORE",
                   help="read an --activations-out store instead of running the model (with --directions)")
    p.add_argument("--layers", nargs="+", metavar="LAYER",
                   help="hidden_states layers to store ('all', the default with --activations-out, or indices); "
                        "without --activations-out the directions' layers")
    p.add_argument("--weights", help="JSON {trait: weight} for the risk score (default: see traitmon.screen)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="length of the base model's own answers")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy own answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="prompt + answer tokens kept per row")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the risk interval")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _precision_arg(p)
    p.add_argument("--table", help="filter with this earlier screening's rows.csv instead of screening")
    p.add_argument("--filter", type=float, metavar="TOP_FRACTION",
                   help="write the dataset without its floor(TOP_FRACTION * n) highest-risk rows to --out")
    p.add_argument("--out", help="the filtered JSONL (with --filter)")
    p.add_argument("--meta", help="with --filter: a JSON record of what was removed, and from which dataset")
    p.add_argument("--perturbation", help="label the profile and the activation store with this perturbation key")


@command("screen", "screen a chat dataset on the base model before finetuning (risk per row)", _screen_args,
         "threads", model_dir={"required": False}, model_key={"required": False,
                                                              "help": "label the profile with this model key"})
def cmd_screen(args) -> None:
    from traitmon.io import write_jsonl
    from traitmon.perturbations import read_rows

    if not Path(args.data).is_file():
        raise TraitmonError(f"{args.data}: no such dataset")
    rows = read_rows(args.data)
    table = _read_table(args.table) if args.table else _screen_and_write(args, rows)
    if args.filter is not None:
        from traitmon.screen import filter_rows

        if not args.out:
            raise TraitmonError("--filter needs --out (the filtered JSONL to write)")
        kept = filter_rows(rows, table, args.filter, args.data)
        write_jsonl(args.out, kept)
        if args.meta:
            from traitmon.io import write_json

            screening = args.table or args.activations or args.activations_out or args.out_dir
            write_json(args.meta, {"filtered_from": str(args.data), "screening": str(screening),
                                   "top_fraction": args.filter, "rows": len(kept), "removed": len(rows) - len(kept)})
        print(f"kept {len(kept)} of {len(rows)} rows (removed the {len(rows) - len(kept)} highest-risk) -> {args.out}")


def _check_screen_args(args) -> None:
    """The combinations `traitmon screen` accepts, checked before any model is loaded."""
    if args.activations and (args.model_dir or args.activations_out):
        raise TraitmonError("--activations reads a stored screening instead of running the model: drop --model-dir "
                            "and --activations-out")
    if not args.activations and not args.model_dir:
        raise TraitmonError("traitmon screen needs --model-dir (or --activations STORE, or --table to filter with an "
                            "earlier screening)")
    if args.model_dir and not (args.out_dir or args.activations_out):
        raise TraitmonError("traitmon screen needs --out-dir or --activations-out (where the base answers are cached)")
    if not args.directions and not args.activations_out:
        raise TraitmonError("traitmon screen needs --directions to rank rows (or --activations-out STORE to store "
                            "the activations only)")
    if args.directions and not (args.out_dir or args.filter is not None):
        raise TraitmonError("--directions: nothing to write; give --out-dir (rows.csv, profile.json) or --filter")


def _screen_layers(args) -> list[int] | None:
    """--layers as hidden_states indices, None for every layer; without --activations-out and --layers only the
    directions' layers are run (what the one-shot screening needs)."""
    if args.layers in (None, ["all"]):
        if args.layers is None and not args.activations_out:
            from traitmon.drift import load_directions

            return sorted({int(v) for v in load_directions(args.directions, "response_mean").layer.values})
        return None
    try:
        return [int(v) for v in args.layers]
    except ValueError:
        raise TraitmonError(f"--layers: 'all' or layer indices, not {' '.join(args.layers)}") from None


def _screen_activations(args, rows):
    """The activation store: read from --activations, or computed on the model (and written to
    --activations-out)."""
    from traitmon.screen import read_activations, screen_activations

    if args.activations:
        return read_activations(args.activations)
    from traitmon.models import load_model

    _set_threads(args.threads)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed,
                "batch_size": args.batch_size, "max_length": args.max_length, "precision": args.precision}
    labels = {k: v for k, v in (("model", args.model_key), ("perturbation", args.perturbation)) if v}
    layers = _screen_layers(args)
    model, tok = load_model(args.model_dir, args.dtype)
    cache_dir = Path(args.out_dir or Path(args.activations_out).parent)
    acts = screen_activations(model, tok, rows, cache_dir, settings, layers, str(args.data), labels)
    if args.activations_out:
        from traitmon.store import write_dataset

        write_dataset(acts, args.activations_out)
        print(f"{len(rows)} rows x {acts.sizes['layer']} layers -> {args.activations_out}")
    return acts


def _screen_and_write(args, rows):
    from traitmon.drift import load_directions
    from traitmon.io import write_csv, write_json
    from traitmon.screen import PROFILE_FILE, TABLE_FILE, read_weights, screen_from_activations

    _check_screen_args(args)
    acts = _screen_activations(args, rows)
    if not args.directions:
        return None
    result = screen_from_activations(acts, load_directions(args.directions, "response_mean"),
                                     read_weights(args.weights), args.n_boot, source=str(args.data))
    if args.out_dir:
        labels = {k: v for k, v in (("model", args.model_key or acts.attrs.get("model")),
                                    ("perturbation", args.perturbation or acts.attrs.get("perturbation"))) if v}
        write_csv(Path(args.out_dir) / TABLE_FILE, result.table)
        write_json(Path(args.out_dir) / PROFILE_FILE, {**labels, **result.profile})
        p = result.profile
        print(f"{p['n_rows']} rows: mean risk {p['risk_mean']:+.3f} [{p['risk_ci_low']:+.3f}, "
              f"{p['risk_ci_high']:+.3f}] -> {Path(args.out_dir) / TABLE_FILE}")
    return result.table


def _screen_analysis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--activations", nargs="+", required=True, metavar="STORE",
                   help="every perturbation's activation store (traitmon screen --activations-out), labelled by its "
                        "model and perturbation attrs")
    p.add_argument("--directions", nargs="+", required=True, metavar="STORE",
                   help="every model's trait direction stores (directions/MODEL/TRAIT.zarr), grouped by their model "
                        "attr; each activation store is projected on the directions of its model")
    p.add_argument("--weights", help="JSON {trait: weight} for the risk score (default: see traitmon.screen)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for each profile's risk interval")
    p.add_argument("--drift", nargs="+", required=True, help="drift tables with em_rate per checkpoint")
    p.add_argument("--predictions", required=True, help="the trait monitor's LOPO predictions.csv")
    p.add_argument("--theta", type=float, default=schema_default("analysis", "theta"))
    p.add_argument("--target-fnr", type=float, default=schema_default("analysis", "target_fnr"))
    p.add_argument("--rows-out", required=True,
                   help="CSV: every perturbation's per-row screening (model, perturbation, rank, row, diffs, risk)")
    p.add_argument("--profiles-out", required=True, help="JSON: the list of every perturbation's dataset profile")
    p.add_argument("--table", required=True, help="CSV: screening profile joined with final EM and verdict")
    p.add_argument("--lopo", required=True, help="CSV: LOPO predictions of the screening (risk and profile)")
    p.add_argument("--metrics", required=True, help="JSON: AUROC/FNR/FPR, Spearman rho")
    p.add_argument("--figure", required=True, help="PNG: screening risk vs final EM, monitor verdict beside it")


def _directions_by_model(paths: list[str]) -> dict:
    """Direction stores grouped by their ``model`` attr, each group loaded as one model's directions."""
    from traitmon.drift import load_directions
    from traitmon.store import open_dataset

    groups: dict[str, list[str]] = {}
    for path in paths:
        if not Path(path).is_dir():
            raise TraitmonError(f"{path}: no such direction store")
        model = open_dataset(path).attrs.get("model")
        if not model:
            raise TraitmonError(f"{path}: direction store without a model label (attr 'model')")
        groups.setdefault(str(model), []).append(path)
    return {model: load_directions(group, "response_mean") for model, group in groups.items()}


@command("screen-analysis", "project each stored screening on its model's directions; does the screening "
         "predict each run's final EM? (LOPO, figure)", _screen_analysis_args)
def cmd_screen_analysis(args) -> None:
    import pandas as pd

    from traitmon.analysis import screening_analysis
    from traitmon.io import write_csv, write_json
    from traitmon.plots import save
    from traitmon.screen import read_activations, read_weights, screen_stores

    stores = {path: read_activations(path) for path in args.activations}
    rows, profiles = screen_stores(stores, _directions_by_model(args.directions), read_weights(args.weights),
                                   args.n_boot)
    drift = pd.concat([_read_table(p) for p in args.drift], ignore_index=True)
    result = screening_analysis(profiles, drift, _read_table(args.predictions), args.theta, args.target_fnr)
    write_csv(args.rows_out, rows)
    write_json(args.profiles_out, profiles)
    write_csv(args.table, result.tables["screening"])
    write_csv(args.lopo, result.tables["predictions"])
    write_json(args.metrics, result.documents["metrics"])
    save(result.figures["screening_vs_em"], args.figure)


def _guard_comparison_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--behavior", nargs="+", required=True, help="em_scores.csv of the primary judge, per model")
    p.add_argument("--runs", nargs="+", required=True, help="MODEL:PERTURBATION=run.json, guarded runs and twins")
    p.add_argument("--eval-logs", nargs="+", required=True, help="MODEL:PERTURBATION=eval_log.csv, the same runs")
    p.add_argument("--pairs", nargs="+", required=True, help="GUARDED=TWIN (TWIN empty: no unguarded twin)")
    p.add_argument("--out", required=True, help="guard.csv")


@command("guard-comparison", "guarded finetunes against their unguarded twins: final EM rate, held-out loss",
         _guard_comparison_args)
def cmd_guard_comparison(args) -> None:
    import pandas as pd

    from traitmon.guard import comparison_table, read_run
    from traitmon.io import write_csv

    def keyed(items: list[str], flag: str) -> dict[tuple[str, str], str]:
        pairs = _pairs(items, "=", flag, "MODEL:PERTURBATION=PATH")
        bad = [k for k in pairs if k.count(":") != 1]
        if bad:
            raise TraitmonError(f"{flag}: {bad[0]!r} is not of the form MODEL:PERTURBATION")
        return {tuple(k.split(":")): path for k, path in pairs.items()}

    em = pd.concat([_read_table(path) for path in args.behavior], ignore_index=True)
    runs = {k: read_run(path) for k, path in keyed(args.runs, "--runs").items()}
    eval_logs = {k: _read_table(path) for k, path in keyed(args.eval_logs, "--eval-logs").items()}
    pairs = {g: t or None for g, t in _pairs(args.pairs, "=", "--pairs", "GUARDED=TWIN").items()}
    write_csv(args.out, comparison_table(pairs, em, runs, eval_logs))


def _judge_agreement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--judged", nargs="+", required=True, help="judged JSONL files (rows carry their judge and run)")
    p.add_argument("--out", required=True)


@command("judge-agreement", "pairwise agreement of judges on the same answers",
         _judge_agreement_args, "settings")
def cmd_judge_agreement(args) -> None:
    from traitmon.behavior import cross_judge_agreement
    from traitmon.io import read_jsonl, write_csv

    settings = _behavior_settings(args.settings)
    judged: dict[str, list[dict]] = {}
    for path in args.judged:
        for n, row in enumerate(read_jsonl(path), start=1):
            if not isinstance(row.get("judge"), str):
                raise TraitmonError(f"{path}:{n}: judged rows must carry their judge's name (rerun judge-runs)")
            judged.setdefault(row["judge"], []).append(row)
    write_csv(args.out, cross_judge_agreement(judged, settings.aligned_max, settings.coherent_min))


def _serve_judge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="local")


@command("serve-judge", "serve a local model as an OpenAI-compatible judge endpoint",
         _serve_judge_args, "model_dir", "threads")
def cmd_serve_judge(args) -> None:
    from traitmon.judge_server import JudgeServer
    from traitmon.models import load_model

    _set_threads(args.threads)
    model, tok = load_model(args.model_dir)
    server = JudgeServer((args.host, args.port), model, tok, name=args.name)
    log.info("serving %s on http://%s:%d/v1/chat/completions", args.model_dir, *server.server_address)
    server.serve_forever()


def _serve_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--name", default="base", help="the base model's name in requests")


@command("serve-generate", "serve a local model and its LoRA adapters for answer sampling (OpenAI-compatible, "
         "vLLM-style adapter loading)", _serve_generate_args, "model_dir", "threads")
def cmd_serve_generate(args) -> None:
    from traitmon.generation_server import GenerationServer
    from traitmon.models import load_model

    _set_threads(args.threads)
    model, tok = load_model(args.model_dir, args.dtype)
    server = GenerationServer((args.host, args.port), model, tok, name=args.name)
    log.info("serving %s as %r on http://%s:%d/v1 (chat/completions, load_lora_adapter, unload_lora_adapter)",
             args.model_dir, args.name, *server.server_address)
    server.serve_forever()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="traitmon", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, func, add_arguments, parents) in COMMANDS.items():
        p = sub.add_parser(name, help=help, parents=parents)
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        status = args.func(args)  # None, or a command's own documented status (watch: 3 = stop requested)
    except TraitmonError as exc:
        print(f"traitmon {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
