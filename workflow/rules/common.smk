# Config validation, wildcard constraints and target lists. No rules here.
import json
import os
from pathlib import Path

from traitmon.config import validate_config
from traitmon.errors import TraitmonError
from traitmon.finetune import checkpoint_steps
from traitmon.traits import trait_file

try:
    validate_config(config, source="config (config.yaml and --config/--configfile)")
except TraitmonError as exc:
    raise WorkflowError(str(exc)) from None

MODELS = list(config["models"])
TRAITS = list(config["traits"])
RES = "results"


PERTURBATIONS = list(config["perturbations"])
STEPS = checkpoint_steps(config["finetune"])  # fixed by config, so the DAG is static


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


PRIMARY_JUDGE = config["analysis"].get("judge", JUDGES[0])


def behavior_targets():
    targets = expand(f"{RES}/behavior/{{judge}}/{{model}}/em_scores.csv", judge=JUDGES, model=MODELS)
    if len(JUDGES) > 1:  # the cross-judge robustness check
        targets += expand(f"{RES}/behavior/{{model}}/judge_agreement.csv", model=MODELS)
    return targets


def analysis_targets():
    return ([f"{RES}/analysis/monitor/metrics.json"] + expand(f"{RES}/analysis/{{model}}/monitor_bundle", model=MODELS)
            + screening_targets())


def screening_targets():
    # screen.smk: each training set screened on the base model, and the screening vs final EM analysis
    return expand(f"{RES}/screen/{{model}}/{{perturbation}}/profile.json", model=MODELS,
                  perturbation=PERTURBATIONS) + [f"{RES}/analysis/screening/metrics.json"]


def all_targets():
    return direction_targets() + capture_targets() + behavior_targets() + analysis_targets()


# ---- input and params helpers (rules stay free of lambdas) -------------------------------------
def model_source_json(wildcards):
    return json.dumps(config["models"][wildcards.model]["source"], sort_keys=True)


def model_dtype(wildcards):
    return config["models"][wildcards.model]["dtype"]


def trait_path(wildcards):
    return str(trait_file(wildcards.trait, config["trait_dirs"]))


def directions_settings(wildcards):
    settings = dict(config["directions"], dtype=config["models"][wildcards.model]["dtype"])
    return json.dumps(settings, sort_keys=True)


def steering_settings(wildcards):
    settings = dict(config["steering"], dtype=config["models"][wildcards.model]["dtype"],
                    seed=config["directions"]["seed"])
    return json.dumps(settings, sort_keys=True)


def perturbation_spec(wildcards):
    return json.dumps(config["perturbations"][wildcards.perturbation], sort_keys=True)


def perturbation_model(wildcards):
    # Only self-generated perturbations need the model; written ones do not wait for (or rerun with) it.
    spec = config["perturbations"][wildcards.perturbation]
    if spec.get("generator", {}).get("mode") == "self":
        return f"{RES}/models/{wildcards.model}"
    return []


def perturbation_model_arg(wildcards, input):
    return f"--model-dir {input.model}" if input.get("model") else ""


def user_dataset(wildcards):
    # A user dataset is an input, so editing it reruns that perturbation's jobs (and only those). A missing one
    # is left out of the DAG's inputs so that only its own job fails, naming the path, not the whole sweep.
    path = config["perturbations"][wildcards.perturbation].get("dataset")
    return path if path and os.path.exists(path) else []


def finetune_settings(wildcards):
    settings = dict(config["finetune"], dtype=config["models"][wildcards.model]["dtype"])
    return json.dumps(settings, sort_keys=True)


def capture_settings(wildcards):
    settings = dict(config["capture"], dtype_model=config["models"][wildcards.model]["dtype"])
    return json.dumps(settings, sort_keys=True)


def behavior_settings(wildcards):
    settings = dict(config["behavior"], dtype_model=config["models"][wildcards.model]["dtype"])
    return json.dumps(settings, sort_keys=True)


def judge_spec(wildcards):
    return json.dumps(config["judges"][wildcards.judge], sort_keys=True)


def model_captures(wildcards):
    return [f"{RES}/capture/{wildcards.model}/base.zarr"] + expand(
        f"{RES}/capture/{wildcards.model}/{{perturbation}}/step-{{step}}.zarr", perturbation=PERTURBATIONS, step=STEPS
    )


def primary_behavior_table(wildcards):
    return f"{RES}/behavior/{PRIMARY_JUDGE}/{wildcards.model}/em_scores.csv"


def model_eval_logs(wildcards):
    return [f"{RES}/finetune/{wildcards.model}/{p}/eval_log.csv" for p in PERTURBATIONS]


def model_answers(wildcards):
    return [f"{RES}/answers/{wildcards.model}/{run}.jsonl" for run in run_names()]


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
