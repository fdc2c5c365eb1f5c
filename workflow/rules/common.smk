# Config validation, wildcard constraints and target lists. No rules here.
import dataclasses
import json
import os
import re
import shlex
from pathlib import Path

from traitmon.config import check_study, checkpoint_steps, validate_config
from traitmon.errors import TraitmonError
from traitmon.guard import guarded_runs, unguarded_twin
from traitmon.settings import CAPTURE_PRECISION, GUARD_BUNDLE, MODEL_DTYPE, as_dict, finetune_json, settings_json, study_settings
from traitmon.traits import trait_file

CONFIG_SOURCE = "config (config.yaml and --config/--configfile)"
try:
    validate_config(config, source=CONFIG_SOURCE)
except TraitmonError as exc:
    raise WorkflowError(str(exc)) from None
SETTINGS = study_settings(config)  # the typed sections, built once from the validated config

MODELS = list(config["models"])
TRAITS = list(config["traits"])
RES = config["results"]  # the results root; every path below is built from it


PERTURBATIONS = list(config["perturbations"])
# training sets filtered from another perturbation's by its screening (rule filter_perturbation)
FILTERED = [p for p, spec in config["perturbations"].items() if "filter" in spec]
# guarded finetunes (finetune.guard, or a perturbation's own guard) and, for each, its unguarded twin or None
GUARDS = guarded_runs(config["perturbations"], SETTINGS.finetune.guard)
TWINS = {p: unguarded_twin(config["perturbations"], p, GUARDS) for p in GUARDS}


def one_of(keys):
    # a wildcard constraint matching exactly these keys ("(?!)" matches nothing)
    return "|".join(re.escape(k) for k in keys) or "(?!)"

STEPS = checkpoint_steps(SETTINGS.finetune)  # fixed by config, so the DAG is static


wildcard_constraints:
    model=r"[a-z0-9][a-z0-9.-]*",
    trait=r"[a-z0-9][a-z0-9.-]*",
    perturbation=r"[a-z0-9][a-z0-9.-]*",
    step=r"\d+",
    judge=r"[a-z0-9][a-z0-9.-]*",


# ---- target lists -------------------------------------------------------------------------------
def direction_targets():
    return expand(f"{RES}/directions/{{model}}/summary.csv", model=MODELS)


def capture_targets():
    return expand(f"{RES}/capture/{{model}}/base.zarr", model=MODELS) + expand(
        f"{RES}/capture/{{model}}/{{perturbation}}/step-{{step}}.zarr",
        model=MODELS, perturbation=PERTURBATIONS, step=STEPS,
    )


def finetune_checkpoint_dirs():
    # One named directory output per configured step (the between-workflow cache needs every output named);
    # {model} and {perturbation} stay wildcards.
    return {f"checkpoint_{step}": directory(f"{RES}/finetune/{{model}}/{{perturbation}}/checkpoint-{step}")
            for step in STEPS}


JUDGES = list(config["judges"])


def run_names():
    # "base" (step 0, shared by every perturbation) and "{perturbation}/step-{step}" for each checkpoint.
    return ["base"] + [f"{p}/step-{s}" for p in PERTURBATIONS for s in STEPS]


PRIMARY_JUDGE = SETTINGS.analysis.judge or JUDGES[0]


def behavior_targets():
    targets = expand(f"{RES}/behavior/{{judge}}/{{model}}/em_scores.csv", judge=JUDGES, model=MODELS)
    if len(JUDGES) > 1:  # the cross-judge robustness check
        targets += expand(f"{RES}/behavior/{{model}}/judge_agreement.csv", model=MODELS)
    return targets


def analysis_targets():
    return ([f"{RES}/analysis/monitor/metrics.json"] + expand(f"{RES}/analysis/{{model}}/monitor_bundle", model=MODELS)
            + screening_targets())


def screening_targets():
    # screen.smk: each training set's activation store on the base model (trait-independent), and the screening
    # analysis (projection on the directions, per-row tables, profiles, screening vs final EM)
    return expand(f"{RES}/screen/{{model}}/{{perturbation}}/activations.zarr", model=MODELS,
                  perturbation=PERTURBATIONS) + [f"{RES}/analysis/screening/metrics.json"]


def screen_layers(wildcards):
    # the config's capture.layers ("all" or indices), as `traitmon screen --layers` takes them
    layers = SETTINGS.capture.layers
    return "all" if layers == "all" else " ".join(str(layer) for layer in layers)


def guard_targets():
    # guard.smk: only a study with guarded runs has the comparison (so a finished unguarded study stays finished)
    return [f"{RES}/analysis/guard/guard.csv"] if GUARDS else []


def all_targets():
    return direction_targets() + capture_targets() + behavior_targets() + analysis_targets() + guard_targets()


# ---- input and params helpers (rules stay free of lambdas) -------------------------------------
def model_source_json(wildcards):
    return json.dumps(config["models"][wildcards.model]["source"], sort_keys=True)


def model_dtype(wildcards):
    return config["models"][wildcards.model]["dtype"]


def trait_path(wildcards):
    return str(trait_file(wildcards.trait, config["trait_dirs"]))


def model_dtype_of(wildcards):
    return {MODEL_DTYPE: SETTINGS.models[wildcards.model].dtype}


def capture_precision_of():
    # every teacher-forced pass of a study computes alike (capture.precision), so its projections compare
    return {CAPTURE_PRECISION: SETTINGS.capture.precision}


def directions_settings(wildcards):
    return settings_json(SETTINGS.directions, **model_dtype_of(wildcards), **capture_precision_of())


def steering_settings(wildcards):
    return settings_json(SETTINGS.steering, seed=SETTINGS.directions.seed, **model_dtype_of(wildcards),
                         **capture_precision_of())


def perturbation_spec(wildcards):
    # the guard acts on the finetune, not on the data: a guarded run and its twin get the same data and spec hash
    spec = config["perturbations"][wildcards.perturbation]
    return json.dumps({k: v for k, v in spec.items() if k != "guard"}, sort_keys=True)


def perturbation_model(wildcards):
    # Only self-generated perturbations need the model; written ones do not wait for (or rerun with) it.
    spec = config["perturbations"][wildcards.perturbation]
    if spec.get("generator", {}).get("mode") == "self":
        return f"{RES}/models/{wildcards.model}"
    return []


def perturbation_model_arg(wildcards, input):
    # pasted into the shell command as is, so the path is quoted here
    return f"--model-dir {shlex.quote(input.model)}" if input.get("model") else ""


def user_dataset(wildcards):
    # A user dataset is an input, so editing it reruns that perturbation's jobs (and only those). A missing one
    # is left out of the DAG's inputs so that only its own job fails, naming the path, not the whole sweep.
    path = config["perturbations"][wildcards.perturbation].get("dataset")
    return path if path and os.path.exists(path) else []


def finetune_settings(wildcards):
    # an unguarded run's blob has no guard key: the blob of the runs made before guards existed (not rerun)
    guard = GUARDS.get(wildcards.perturbation)
    extra = {GUARD_BUNDLE: guard_bundle(wildcards)} if guard else {}
    return finetune_json(dataclasses.replace(SETTINGS.finetune, guard=guard), **model_dtype_of(wildcards), **extra)


def guard_bundle(wildcards):
    # what a guarded finetune builds its monitor bundle from: rule monitor_bundle's inputs and settings
    return {"model_key": wildcards.model, "directions": model_directions(wildcards),
            "per_trait_questions": SETTINGS.capture.per_trait_questions,
            "variant": SETTINGS.analysis.variant, "batch_size": SETTINGS.capture.batch_size,
            "precision": SETTINGS.capture.precision}


# a guarded finetune's extra inputs; an unguarded one gets none (its inputs are those of before guards existed)
def guard_monitor(wildcards):
    guard = GUARDS.get(wildcards.perturbation)
    return guard.monitor if guard else []


def guard_directions(wildcards):
    return model_directions(wildcards) if wildcards.perturbation in GUARDS else []


def guard_compared():
    # the guarded perturbations and their twins, in config order
    twins = {t for t in TWINS.values() if t}
    return [p for p in PERTURBATIONS if p in GUARDS or p in twins]


def guard_run_files(wildcards):
    return [f"{RES}/finetune/{m}/{p}/run.json" for m in MODELS for p in guard_compared()]


def guard_eval_logs(wildcards):
    return [f"{RES}/finetune/{m}/{p}/eval_log.csv" for m in MODELS for p in guard_compared()]


def guard_keyed(paths):
    # MODEL:PERTURBATION=PATH, in the order of guard_run_files / guard_eval_logs
    return [f"{m}:{p}={path}" for (m, p), path in zip([(m, p) for m in MODELS for p in guard_compared()], paths)]


def guard_runs_arg(wildcards, input):
    return guard_keyed(input.runs)


def guard_eval_logs_arg(wildcards, input):
    return guard_keyed(input.eval_logs)


def guard_pairs(wildcards):
    return [f"{g}={TWINS[g] or ''}" for g in GUARDS]


def capture_settings(wildcards):
    return settings_json(SETTINGS.capture, **model_dtype_of(wildcards))


def behavior_settings(wildcards):
    return settings_json(SETTINGS.behavior, **model_dtype_of(wildcards))


# What answer sampling reads of the behavior section: the judging cut-offs are left out (changing them re-judges
# without re-sampling), and the EM answers leave out trait_questions too (they never ask trait questions).
JUDGING_ONLY = ("aligned_max", "coherent_min", "max_unscorable")


def sampling_settings(wildcards, dropped):
    keep = {k: v for k, v in as_dict(SETTINGS.behavior).items() if k not in dropped}
    return json.dumps({**keep, **model_dtype_of(wildcards)}, sort_keys=True)


def em_sampling_settings(wildcards):
    return sampling_settings(wildcards, JUDGING_ONLY + ("trait_questions",))


def trait_sampling_settings(wildcards):
    return sampling_settings(wildcards, JUDGING_ONLY)


def judge_spec(wildcards):
    return json.dumps(config["judges"][wildcards.judge], sort_keys=True)


def model_captures(wildcards):
    return [f"{RES}/capture/{wildcards.model}/base.zarr"] + expand(
        f"{RES}/capture/{wildcards.model}/{{perturbation}}/step-{{step}}.zarr", perturbation=PERTURBATIONS, step=STEPS
    )


def primary_behavior_table(wildcards):
    return f"{RES}/behavior/{PRIMARY_JUDGE}/{wildcards.model}/em_scores.csv"


def study_checked():
    # The drift/analysis stage compares perturbations: with fewer than 2 a study would fail only at its very end.
    # Checked while the DAG is built (drift's inputs), so it stops before any job, and runs of other stages'
    # targets (directions only, one finetune) need not configure a study.
    try:
        check_study(config, source=CONFIG_SOURCE)
    except TraitmonError as exc:
        raise WorkflowError(str(exc)) from None


def model_eval_logs(wildcards):
    study_checked()
    return [f"{RES}/finetune/{wildcards.model}/{p}/eval_log.csv" for p in PERTURBATIONS]


def model_answers(wildcards):
    # the EM answers of every checkpoint, and (when behavior.trait_questions > 0) the model's trait answers
    em = [f"{RES}/answers/{wildcards.model}/{run}.jsonl" for run in run_names()]
    return em + ([f"{RES}/answers/{wildcards.model}/traits.jsonl"] if SETTINGS.behavior.trait_questions else [])


def model_adapters(wildcards):
    return [f"{RES}/finetune/{wildcards.model}/{p}/checkpoint-{s}" for p in PERTURBATIONS for s in STEPS]


def trait_answer_runs(wildcards, input):
    # base:0 and PERTURBATION:STEP=ADAPTER per checkpoint (a list: `:q` quotes each)
    checkpoints = [(p, s) for p in PERTURBATIONS for s in STEPS]
    return ["base:0"] + [f"{p}:{s}={a}" for (p, s), a in zip(checkpoints, input.adapters)]


def behavior_runs(wildcards):
    # model:perturbation:step, in the order of run_names(); the base model is step 0 of every perturbation
    runs = [f"{wildcards.model}:base:0"] + [f"{wildcards.model}:{p}:{s}" for p in PERTURBATIONS for s in STEPS]
    return " ".join(runs)


def results_root(wildcards, input):
    # results/capture/{model}/base.zarr -> results
    return str(Path(input.captures[0]).parents[2])


def analysis_dir(wildcards, output):
    return str(Path(output.drift).parent)


def perturbation_kinds(wildcards):
    return " ".join(f"{p}:{spec['kind']}" for p, spec in config["perturbations"].items())


# ---- analysis: leave-one-domain-out groups, run styles, the SAE baseline's settings ----------------
SAE = SETTINGS.analysis.sae


def unfiltered_spec(key):
    # a filtered perturbation takes its domain and style from the perturbation it was filtered from
    spec = config["perturbations"][key]
    return config["perturbations"][spec["filter"]["of"]] if "filter" in spec else spec


def perturbation_domains(wildcards):
    # leave-one-domain-out groups: the spec's domain, else its generator's domain, else the perturbation's own key
    # (a filtered set is held out with the one it was filtered from)
    groups = []
    for p, spec in config["perturbations"].items():
        source = unfiltered_spec(p)
        key = spec["filter"]["of"] if "filter" in spec else p
        groups.append(f"{p}:{spec.get('domain') or source.get('domain') or source.get('generator', {}).get('domain') or key}")
    return groups


def perturbation_styles(wildcards):
    return [f"{p}:{unfiltered_spec(p).get('generator', {}).get('style', 'plain')}" for p in PERTURBATIONS]


def filter_source(wildcards):
    of = config["perturbations"][wildcards.perturbation]["filter"]["of"]
    return {"data": f"{RES}/data/{wildcards.model}/{of}/train.jsonl",
            "heldout": f"{RES}/data/{wildcards.model}/{of}/heldout.jsonl",
            "activations": f"{RES}/screen/{wildcards.model}/{of}/activations.zarr",
            "directions": model_directions(wildcards)}


def sae_directions(wildcards):
    # the layer is the traits' median chosen layer unless analysis.sae.layer fixes it (then the SAE depends only
    # on the base capture and that layer)
    return [] if SAE.layer is not None else model_directions(wildcards)


def sae_layer_arg(wildcards):
    return f"--layer {SAE.layer}" if SAE.layer is not None else ""


def sae_settings(wildcards):
    return json.dumps({k: v for k, v in as_dict(SAE).items() if k != "layer"}, sort_keys=True)


def trait_files(wildcards):
    return [str(trait_file(t, config["trait_dirs"])) for t in TRAITS]


def model_directions(wildcards):
    return expand(f"{RES}/directions/{wildcards.model}/{{trait}}.zarr", trait=TRAITS)


def model_steering(wildcards):
    return expand(f"{RES}/directions/{wildcards.model}/{{trait}}.steering.csv", trait=TRAITS)


# ---- resources: scale with model size (params_b, in billions) ----------------------------------
def model_mem_mb(wildcards, attempt):
    res = config["resources"]
    size = config["models"][wildcards.model]["params_b"]
    return int((res["mem_mb_base"] + res["mem_mb_per_b_params"] * size) * attempt)


def model_runtime(wildcards, attempt):
    res = config["resources"]
    size = config["models"][wildcards.model]["params_b"]
    return int((res["runtime_base"] + res["runtime_per_b_params"] * size) * attempt)


GPU = config["resources"]["gpu"]
THREADS = config["resources"]["threads"]
