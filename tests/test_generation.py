"""Answer sampling: seeded reproducibility, and the server backend over real HTTP against serve-generate."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model

from conftest import REPO
from traitmon.behavior import sample_answers_server
from traitmon.config import validate_config
from traitmon.errors import TraitmonError
from traitmon.generate import (
    ServerGenerator,
    TopKSampler,
    generate_responses,
    sampling_top_k,
    seeded_generator,
)
from traitmon.generation_server import start_server
from traitmon.models import attach_adapter, load_model
from traitmon.settings import BehaviorSettings, build, section_defaults

PROMPTS = [[{"role": "user", "content": q}] for q in ("What would you do with power?", "Hello", "Tell me a secret")]


@pytest.fixture()
def adapter_dir(tiny_model_dir, tmp_path):
    """A LoRA adapter whose B is not zero, so it changes the answers."""
    model, _ = load_model(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_seeded_sampling_is_identical_run_to_run(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, "bfloat16")
    first = generate_responses(model, tok, PROMPTS * 3, 12, 0.7, 4, seed=5)
    again = generate_responses(model, tok, PROMPTS * 3, 12, 0.7, 4, seed=5)
    other = generate_responses(model, tok, PROMPTS * 3, 12, 0.7, 4, seed=6)
    assert first == again
    assert first != other  # the seed does drive the sampling


def test_top_k_sampler_draws_from_the_tempered_top_k_distribution():
    scores = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
    rows = 40_000
    sampler = TopKSampler(0.7, 3, seeded_generator(0, torch.device("cpu")))
    out = sampler(torch.zeros(rows, 1, dtype=torch.long), scores.expand(rows, -1).clone())
    assert torch.all((out == 0).sum(-1) == 1) and torch.all(torch.isinf(out).sum(-1) == 5)  # one token left each
    counts = torch.bincount(out.argmax(-1), minlength=6).double() / rows
    top = torch.tensor([5, 0, 1])  # the 3 best tokens
    expected = torch.zeros(6, dtype=torch.double)
    expected[top] = torch.softmax(scores[top].double() / 0.7, 0)
    assert torch.allclose(counts, expected, atol=0.01), (counts, expected)
    # the whole vocabulary when top_k is None; the same generator seed draws the same tokens
    draw = lambda: TopKSampler(1.0, None, seeded_generator(3, torch.device("cpu")))(None, scores.expand(rows, -1).clone())
    assert torch.bincount(draw().argmax(-1), minlength=6).min() > 0 and torch.equal(draw(), draw())
    with pytest.raises(TraitmonError, match="temperature"):
        TopKSampler(0.0, 50, seeded_generator(0, torch.device("cpu")))


def test_sampled_answers_do_not_depend_on_the_global_rng(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, "bfloat16")
    model.generation_config.top_k = None
    assert sampling_top_k(model) == 50  # generate(do_sample=True)'s default when the model sets none
    model.generation_config.top_k = 7
    assert sampling_top_k(model) == 7
    model.generation_config.top_k = None
    torch.manual_seed(1)
    first = generate_responses(model, tok, PROMPTS, 8, 0.7, 4, seed=5)
    torch.manual_seed(2)
    assert generate_responses(model, tok, PROMPTS, 8, 0.7, 4, seed=5) == first


def test_bf16_precision_decodes_under_autocast_and_float32_stays_float32(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    computed = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: computed.append(out.dtype))
    try:
        generate_responses(model, tok, PROMPTS, max_new_tokens=3, precision="bf16")
        n_bf16 = len(computed)
        generate_responses(model, tok, PROMPTS, max_new_tokens=3)
    finally:
        hook.remove()
    assert set(computed[:n_bf16]) == {torch.bfloat16} and set(computed[n_bf16:]) == {torch.float32}
    assert next(model.parameters()).dtype == torch.float32


def test_server_backend_over_http_loads_samples_and_unloads_an_adapter(tiny_model_dir, adapter_dir):
    base, tok = load_model(tiny_model_dir)
    server = start_server(base, tok, name="tiny")
    url = "http://{}:{}/v1".format(*server.server_address)
    try:
        client = ServerGenerator(url, "tiny")
        base_greedy = client.responses(PROMPTS, 10, 0.0, seed=0)
        client.load_adapter("run-a", str(adapter_dir))
        greedy = client.responses(PROMPTS, 10, 0.0, seed=0, model="run-a")
        sampled = client.responses(PROMPTS, 10, 0.9, seed=3, model="run-a")
        assert client.responses(PROMPTS, 10, 0.9, seed=3, model="run-a") == sampled  # seeded: reproducible
        # greedy answers equal the in-process backend's, with and without the adapter
        local_base, _ = load_model(tiny_model_dir)
        assert base_greedy == generate_responses(local_base, tok, PROMPTS, 10, 0.0, batch_size=1)
        local = attach_adapter(load_model(tiny_model_dir)[0], adapter_dir)
        assert greedy == generate_responses(local, tok, PROMPTS, 10, 0.0, batch_size=1)
        assert greedy != base_greedy  # the adapter was used
        # the base model stays servable while an adapter is loaded
        assert client.responses(PROMPTS, 10, 0.0, seed=0) == base_greedy
        client.unload_adapter("run-a")
        with pytest.raises(TraitmonError, match="HTTP 404"):
            client.responses(PROMPTS[:1], 4, 0.0, seed=0, model="run-a")
        with pytest.raises(TraitmonError, match="HTTP 400"):
            client.load_adapter("bad", str(tiny_model_dir))  # a model folder, not an adapter
    finally:
        server.shutdown()


def test_sample_answers_through_the_server_backend(tiny_model_dir, adapter_dir):
    base, tok = load_model(tiny_model_dir)
    server = start_server(base, tok, name="tiny")
    generation = {"backend": "server", "dtype": "auto", "model": "tiny", "timeout": 60,
                  "base_url": "http://{}:{}/v1".format(*server.server_address), "concurrency": 2}
    settings = build(BehaviorSettings, {**section_defaults("behavior"), "samples_per_question": 1,
                                        "trait_questions": 0, "temperature": 0.7, "max_new_tokens": 6, "seed": 0,
                                        "generation": generation}, "behavior")
    run = {"model": "tiny", "perturbation": "p", "step": 5}
    try:
        rows = sample_answers_server(settings, run, adapter=str(adapter_dir))
        assert rows == sample_answers_server(settings, run, adapter=str(adapter_dir))
        assert server.adapters == {}  # unloaded after use
    finally:
        server.shutdown()
    assert rows and all(r["step"] == 5 and isinstance(r["answer"], str) for r in rows)


def test_server_backend_needs_an_endpoint_and_hf_stays_the_default():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    assert validate_config(copy.deepcopy(config))["behavior"]["generation"]["backend"] == "hf"
    config["behavior"]["generation"] = {"backend": "server"}
    with pytest.raises(TraitmonError, match="base_url"):
        validate_config(config)


def test_serve_generate_command_is_registered():
    out = subprocess.run([sys.executable, "-m", "traitmon.cli", "serve-generate", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--model-dir" in out and "--dtype" in out


@pytest.mark.parametrize("sampling_dtype", ["bfloat16", "float32"])  # loaded again for sampling / the same model
def test_measure_writes_what_capture_and_answers_write(tiny_model_dir, adapter_dir, tmp_path, sampling_dtype):
    """One process per checkpoint: ``traitmon measure`` gives the store ``capture`` gives and the answers
    ``answers`` gives, for an adapter and for the base model."""
    import json

    import xarray as xr

    from traitmon.cli import main
    from traitmon.io import read_jsonl
    from traitmon.store import open_dataset

    capture = json.dumps({**section_defaults("capture"), "per_trait_questions": 1, "precision": "bf16",
                          "model_dtype": "auto"})
    behavior = {k: v for k, v in section_defaults("behavior").items() if k not in ("aligned_max", "coherent_min",
                                                                                   "max_unscorable", "trait_questions")}
    behavior.update(samples_per_question=1, max_new_tokens=6, temperature=0.7, model_dtype="auto",
                    generation={**behavior["generation"], "dtype": sampling_dtype})
    answers = json.dumps(behavior)
    common = ["--model-dir", str(tiny_model_dir), "--model-key", "tiny", "--threads", "1"]
    for run, name in ((["--adapter", str(adapter_dir), "--perturbation", "med-em", "--step", "4"], "ckpt"),
                      ([], "base")):
        assert main(["measure", *common, *run, "--capture-settings", capture, "--answer-settings", answers,
                     "--capture-out", str(tmp_path / f"{name}-m.zarr"),
                     "--answers-out", str(tmp_path / f"{name}-m.jsonl")]) == 0
        assert main(["capture", *common, *run, "--settings", capture, "--out", str(tmp_path / f"{name}-c.zarr")]) == 0
        run_answers = run if run else ["--perturbation", "base"]
        assert main(["answers", *common, *run_answers, "--settings", answers,
                     "--out", str(tmp_path / f"{name}-a.jsonl")]) == 0
        merged, alone = (open_dataset(tmp_path / f"{name}-{k}.zarr") for k in ("m", "c"))
        xr.testing.assert_identical(merged, alone)
        rows = read_jsonl(tmp_path / f"{name}-m.jsonl")
        assert rows == read_jsonl(tmp_path / f"{name}-a.jsonl") and len(rows) == 20
        assert {r["perturbation"] for r in rows} == {"med-em" if run else "base"}
    assert open_dataset(tmp_path / "base-m.zarr").attrs["perturbation"] == ""  # as capture_base wrote it
    # a bad settings blob names its flag
    assert main(["measure", *common, "--capture-settings", capture, "--answer-settings", "{}",
                 "--capture-out", str(tmp_path / "x.zarr"), "--answers-out", str(tmp_path / "x.jsonl")]) == 2
