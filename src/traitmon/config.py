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
from traitmon.io import data_path
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
    load_traits(config["traits"], config.get("trait_dirs", []))
    return config


def load_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise TraitmonError(f"{path}: cannot read config ({exc})") from None
    if not isinstance(config, dict):
        raise TraitmonError(f"{path}: a config must be a YAML mapping")
    return validate_config(config, str(path))
