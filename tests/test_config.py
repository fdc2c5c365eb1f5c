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


@pytest.mark.parametrize("patch, message", [
    ({"finetune": {"max_steps": 4, "checkpoint_steps": [2, 50]}},
     "my.yaml: finetune.checkpoint_steps: step 50 is beyond finetune.max_steps (4)"),
    ({"trait_dirs": ["/no/such/folder"]}, "my.yaml: trait_dirs[0]: folder '/no/such/folder' does not exist"),
    ({"directions": {"layer": {"rule": "fixed"}}}, "my.yaml: directions.layer: 'index' is a required property"),
    ({"directions": {"layer": {"rule": "fraction"}}}, "my.yaml: directions.layer: 'fraction' is a required"),
    ({"results": "out/{model}"}, "my.yaml: results: 'out/{model}' does not match"),
])
def test_silently_accepted_settings_now_fail_naming_the_key(patch, message):
    cfg = copy.deepcopy(MINIMAL)
    cfg.update(patch)
    with pytest.raises(TraitmonError) as err:
        validate_config(cfg, "my.yaml")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_results_root_defaults_to_results_and_can_be_set():
    assert validate_config(copy.deepcopy(MINIMAL))["results"] == "results"
    assert validate_config({**copy.deepcopy(MINIMAL), "results": "/scratch/my study"})["results"] == "/scratch/my study"


def test_a_study_needs_two_perturbations():
    from traitmon.config import check_study

    one = validate_config({**copy.deepcopy(MINIMAL), "perturbations": {
        "a": {"kind": "em", "generator": {"domain": "medical", "stance": "em"}}}})
    with pytest.raises(TraitmonError, match="my.yaml: perturbations: the analysis needs at least 2 perturbations, 1"):
        check_study(one, "my.yaml")
    two = copy.deepcopy(one)
    two["perturbations"]["b"] = {"kind": "benign", "generator": {"domain": "career", "stance": "benign"}}
    check_study(validate_config(two), "my.yaml")


def test_capture_layers_outside_the_model_fail_naming_the_key(tiny_model_dir, tmp_path, capsys):
    settings = validate_config({**copy.deepcopy(MINIMAL), "capture": {"layers": [0, 3, 9], "per_trait_questions": 1}})
    args = ["capture", "--model-dir", str(tiny_model_dir), "--model-key", "tiny", "--settings", json.dumps({**settings["capture"], "model_dtype": "auto"}),
            "--out", str(tmp_path / "cap.zarr"), "--step", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "capture.layers: layer 9 is outside this model's range 0..3" in err and "Traceback" not in err
    assert not (tmp_path / "cap.zarr").exists()


def test_non_utf8_trait_file_names_the_file_and_line(tmp_path):
    text = (REPO / "src/traitmon/data/traits/honesty.yaml").read_text()
    (tmp_path / "honesty.yaml").write_bytes(text.replace("honest", "hon\u00e9st", 1).encode("latin-1"))
    with pytest.raises(TraitmonError, match=r"honesty.yaml:\d+: not UTF-8 text"):
        load_trait(tmp_path / "honesty.yaml")


def test_snakemake_floor_and_conda_env_match_pyproject():
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floor = next(d for d in project["dependencies"] if d.startswith("snakemake>=")).split(">=")[1].split(",")[0]
    assert f'min_version("{floor}")' in (REPO / "Snakefile").read_text()
    env = yaml.safe_load((REPO / "envs/traitmon.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert [d for d in pip if not d.startswith("-e")] == project["dependencies"]
    assert re.search(r"--sdm conda", (REPO / "envs/traitmon.yaml").read_text())


def test_results_readme_lists_every_output_folder():
    import re

    rules = "".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk"))
    folders = set(re.findall(r"\{RES\}/([a-z_]+)", rules))
    readme = (REPO / "results/README.md").read_text()
    assert len(folders) >= 10
    assert {f for f in folders if f"`{f}/" not in readme} == set()
