"""Load and validate a traitmon config against ``config.schema.yaml``, filling defaults.

Errors say which file and key broke the schema, e.g.
``config.yaml: directions.batch_size: 0 is less than the minimum of 1``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

from traitmon.errors import TraitmonError
from traitmon.io import data_path, read_text
from traitmon.settings import FinetuneSettings
from traitmon.traits import load_traits

SCHEMA_PATH = data_path("config.schema.yaml")


def _with_defaults(validator_class):
    """A validator that fills ``default`` values of object properties while validating."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def validate_config(config: dict, source: str = "config") -> dict:
    """Validate in place (defaults filled) and return ``config``; raise TraitmonError naming the key.

    Also loads every listed trait file, so a malformed or unknown trait fails here, at config-load time.
    """
    validator = _with_defaults(jsonschema.Draft202012Validator)(load_schema())
    # Fill defaults first (validation of a partial object sets them), then report the first real error.
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        err = errors[0]
        raise TraitmonError(f"{source}: {_key_path(err)}: {err.message}")
    _check_trait_dirs(config["trait_dirs"], source)
    _check_checkpoint_steps(config["finetune"], source)
    _check_filters(config["perturbations"], source)
    _check_guards(config, source)
    load_traits(config["traits"], config["trait_dirs"])
    return config


def _check_trait_dirs(trait_dirs: list[str], source: str) -> None:
    # A missing folder would otherwise fall back silently to the built-in trait of the same name.
    for i, folder in enumerate(trait_dirs):
        if not Path(folder).is_dir():
            raise TraitmonError(f"{source}: trait_dirs[{i}]: folder '{folder}' does not exist")


def _check_checkpoint_steps(finetune: dict, source: str) -> None:
    beyond = sorted(s for s in finetune.get("checkpoint_steps") or [] if s > finetune["max_steps"])
    if beyond:
        raise TraitmonError(f"{source}: finetune.checkpoint_steps: step {beyond[0]} is beyond "
                            f"finetune.max_steps ({finetune['max_steps']})")


def _check_filters(perturbations: dict, source: str) -> None:
    # A filtered perturbation is screened from another's training set, which must itself be a plain one.
    for key, spec in perturbations.items():
        of = spec.get("filter", {}).get("of")
        if of is None:
            continue
        if of not in perturbations:
            raise TraitmonError(f"{source}: perturbations.{key}.filter.of: '{of}' is not a configured perturbation")
        if "filter" in perturbations[of]:
            raise TraitmonError(f"{source}: perturbations.{key}.filter.of: '{of}' is itself filtered; "
                                f"filter a dataset or generator perturbation")


def _check_guards(config: dict, source: str) -> None:
    # A guarded finetune reads its monitor when it starts: a missing one must stop the study before any job.
    guards = {"finetune.guard": config["finetune"].get("guard")}
    guards.update({f"perturbations.{k}.guard": spec.get("guard") for k, spec in config["perturbations"].items()})
    for key, guard in guards.items():
        if isinstance(guard, dict) and not Path(guard["monitor"]).is_file():
            raise TraitmonError(f"{source}: {key}.monitor: file '{guard['monitor']}' does not exist (a monitor.json "
                                "fitted by an earlier study's analysis, e.g. results/analysis/monitor/monitor.json)")


def check_study(config: dict, source: str = "config") -> None:
    """What a whole study (drift, monitor, analysis) needs beyond the schema: two perturbations to compare."""
    if len(config["perturbations"]) < 2:
        raise TraitmonError(f"{source}: perturbations: the analysis needs at least 2 perturbations, "
                            f"{len(config['perturbations'])} configured")


def check_layers(layers: list[int], n_layers: int, key: str = "capture.layers") -> None:
    """Layers (hidden_states indices) must exist in the model: 0 (embeddings) .. ``n_layers``."""
    outside = sorted(layer for layer in layers if not 0 <= layer <= n_layers)
    if outside:
        raise TraitmonError(f"{key}: layer {outside[0]} is outside this model's range 0..{n_layers} "
                            f"(hidden_states indexing, 0 = embeddings)")


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = yaml.safe_load(read_text(path))
    except (OSError, yaml.YAMLError) as exc:
        raise TraitmonError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(config, dict):
        raise TraitmonError(f"{path}: a config must be a YAML mapping")
    return validate_config(config, str(path))


def checkpoint_steps(settings: FinetuneSettings) -> list[int]:
    """Steps (> 0) at which adapters are saved: an explicit list, or every k steps, always with the last."""
    if settings.checkpoint_steps:
        steps = set(settings.checkpoint_steps)
    else:
        steps = set(range(settings.checkpoint_every, settings.max_steps + 1, settings.checkpoint_every))
    steps.add(settings.max_steps)
    return sorted(s for s in steps if 0 < s <= settings.max_steps)
