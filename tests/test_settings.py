"""Typed settings: built once from a validated config, parsed from --settings blobs with one-line errors."""

import dataclasses
import json

import pytest

from traitmon.config import validate_config
from traitmon.errors import TraitmonError
from traitmon.settings import (
    MODEL_DTYPE,
    CaptureSettings,
    FinetuneSettings,
    parse_settings,
    section_defaults,
    settings_json,
    study_settings,
)


def _config():
    return validate_config({"models": {"m": {"source": {"path": "x"}, "dtype": "bfloat16"}}, "traits": ["honesty"],
                            "finetune": {"max_steps": 4, "checkpoint_every": 2}})


def test_sections_are_frozen_dataclasses_with_the_schema_defaults():
    settings = study_settings(_config())
    assert settings.finetune.max_steps == 4 and settings.finetune.rank == section_defaults("finetune")["rank"]
    assert settings.models["m"].dtype == "bfloat16"
    assert settings.analysis.theta == section_defaults("analysis")["theta"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.finetune.max_steps = 5


def test_blob_round_trip_carries_the_model_dtype_under_one_name():
    settings = study_settings(_config())
    blob = settings_json(settings.capture, **{MODEL_DTYPE: "bfloat16"})
    parsed, extra = parse_settings(blob, CaptureSettings, MODEL_DTYPE)
    assert parsed == settings.capture and extra == {MODEL_DTYPE: "bfloat16"}


@pytest.mark.parametrize(("change", "message"), [
    ({"learning_rate": 1.0}, "--settings: unknown key 'learning_rate'"),
    ({"rank": None}, "--settings: missing key 'rank'"),
    ({MODEL_DTYPE: None}, "--settings: missing key 'model_dtype'"),
])
def test_a_bad_blob_names_the_key(change, message):
    values = {**json.loads(settings_json(study_settings(_config()).finetune)), MODEL_DTYPE: "auto", **change}
    values = {k: v for k, v in values.items() if v is not None or k == "checkpoint_steps"}
    with pytest.raises(TraitmonError, match=message) as err:
        parse_settings(json.dumps(values), FinetuneSettings, MODEL_DTYPE)
    assert "\n" not in str(err.value)


def test_judge_entries_take_the_schema_defaults_in_the_config_and_on_the_command_line():
    from traitmon.judges import OpenAIJudge, make_judge
    from traitmon.settings import judge_defaults

    config = _config()
    config = validate_config({**config, "judges": {"remote": {"type": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                              "model": "m"}}})
    entry = study_settings(config).judges["remote"]
    assert entry.concurrency == judge_defaults()["concurrency"] and entry.base_url == "http://127.0.0.1:9/v1"
    for judge in (make_judge(entry), make_judge({"type": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                 "model": "m"})):
        assert isinstance(judge, OpenAIJudge)
        assert (judge.concurrency, judge.max_retries) == (entry.concurrency, entry.max_retries)
    with pytest.raises(TraitmonError, match="judge spec: unknown key 'conccurency'"):
        make_judge({"type": "embedded", "conccurency": 2})
