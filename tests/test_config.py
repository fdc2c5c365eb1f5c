import copy
import json

import pytest
import yaml

from conftest import REPO
from traitmon.cli import main
from traitmon.config import load_config, validate_config
from traitmon.errors import TraitmonError
from traitmon.traits import load_trait

MINIMAL = {"models": {"m": {"source": {"path": "/x"}}}, "traits": ["honesty"]}


def test_default_config_is_valid_and_defaults_are_filled():
    cfg = load_config(REPO / "config.yaml")
    assert "smollm2-135m-instruct" in cfg["models"]
    assert len(cfg["traits"]) == 7
    assert cfg["directions"]["layer"]["rule"] == "best"
    small = validate_config(copy.deepcopy(MINIMAL))
    assert small["directions"]["batch_size"] == 16 and small["directions"]["layer"]["min_fraction"] == 0.2


@pytest.mark.parametrize("patch, message", [
    ({"directions": {"batch_size": 0}}, "directions.batch_size: 0 is less than the minimum of 1"),
    ({"models": {"Bad_Key": {"source": {"path": "/x"}}}}, "models"),
    ({"models": {"m": {"source": {"hub": "a/b", "path": "/x"}}}}, "models.m.source"),
    ({"directions": {"layer": {"rule": "deepest"}}}, "directions.layer.rule: 'deepest' is not one of"),
    ({"colour": "blue"}, "'colour' was unexpected"),
])
def test_schema_errors_name_the_key(patch, message):
    cfg = copy.deepcopy(MINIMAL)
    cfg.update(patch)
    with pytest.raises(TraitmonError) as err:
        validate_config(cfg, "my.yaml")
    assert str(err.value).startswith("my.yaml: ")
    assert message in str(err.value)


def test_unknown_trait_is_named():
    with pytest.raises(TraitmonError, match="unknown trait 'curiosity'.*known traits"):
        validate_config({**copy.deepcopy(MINIMAL), "traits": ["honesty", "curiosity"]})


def test_user_trait_dir_adds_a_trait_and_malformed_file_names_the_field(tmp_path):
    good = yaml.safe_load((REPO / "src/traitmon/data/traits/honesty.yaml").read_text())
    good["name"] = "candour"
    (tmp_path / "candour.yaml").write_text(yaml.safe_dump(good))
    cfg = validate_config({**copy.deepcopy(MINIMAL), "traits": ["candour"], "trait_dirs": [str(tmp_path)]})
    assert cfg["traits"] == ["candour"]
    bad = dict(good, name="terse", extraction_questions=good["extraction_questions"][:3])
    (tmp_path / "terse.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(TraitmonError, match=r"terse.yaml: field 'extraction_questions' has 3 entries"):
        load_trait(tmp_path / "terse.yaml")
    (tmp_path / "broken.yaml").write_text("name: broken\npairs: [\n")
    with pytest.raises(TraitmonError, match="broken.yaml: not valid YAML"):
        load_trait(tmp_path / "broken.yaml")


def test_builtin_traits_meet_the_minimums():
    cfg = load_config(REPO / "config.yaml")
    from traitmon.traits import load_traits
    traits = load_traits(cfg["traits"])
    for trait in traits.values():
        assert len(trait.pairs) >= 5
        assert len(trait.extraction_questions) >= 20 and len(trait.evaluation_questions) >= 20


def test_cli_reports_config_error_without_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({**MINIMAL, "directions": {"temperature": -1}}))
    assert main(["validate-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "directions.temperature" in err and "Traceback" not in err


def test_model_that_will_not_load_names_key_and_source(tmp_path):
    from traitmon.models import convert_model
    with pytest.raises(TraitmonError, match=r"model 'ghost' could not be loaded from path:/nonexistent"):
        convert_model("ghost", {"path": "/nonexistent"}, tmp_path / "ghost")
    with pytest.raises(TraitmonError, match=r"model 'pkg'.*package 'no_such_pkg' is not installed"):
        convert_model("pkg", {"gguf_package": "no_such_pkg", "gguf_file": "x.gguf"}, tmp_path / "pkg")
