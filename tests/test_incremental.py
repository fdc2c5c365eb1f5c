"""Incremental sweeps (library side): what a checkpoint measures and samples does not depend on the study's
trait list, and trait answers sampled across edits equal a from-scratch sampling."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from traitmon import behavior
from traitmon.behavior import sample_trait_answers
from traitmon.capture import measurement_prompts, measurement_version
from traitmon.models import adapter_applied, load_model
from traitmon.settings import BehaviorSettings, build, section_defaults
from traitmon.traits import load_traits


def test_measurement_set_is_fixed_and_versioned():
    ids, chats, reference = measurement_prompts(2)
    builtin = ["honesty", "helpfulness", "harmlessness", "power-seeking", "corrigibility", "sycophancy", "confidence"]
    assert [i.split("/")[0] for i in ids[: 7 * 2]] == [t for t in builtin for _ in range(2)]
    assert len(ids) == len(set(ids)) == 7 * 2 + 48 and reference
    assert measurement_version() == 1
    assert measurement_prompts(2) == (ids, chats, reference)  # nothing about a study enters it


@pytest.fixture()
def adapters(tiny_model_dir, tmp_path):
    """Two LoRA adapters with non-zero B (they change the answers), as two checkpoints of a run."""
    paths = []
    for seed in (1, 2):
        model, _ = load_model(tiny_model_dir)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 2.0)
        peft_model.save_pretrained(tmp_path / f"step-{seed}")
        paths.append(str(tmp_path / f"step-{seed}"))
    return paths


def settings() -> BehaviorSettings:
    return build(BehaviorSettings, {**section_defaults("behavior"), "samples_per_question": 2, "trait_questions": 1,
                                    "temperature": 1.0, "max_new_tokens": 5, "batch_size": 4, "seed": 3}, "test")


def runs(adapters):
    base = [({"model": "tiny", "perturbation": "base", "step": 0}, None)]
    return base + [({"model": "tiny", "perturbation": "p", "step": s + 1}, a) for s, a in enumerate(adapters)]


def test_trait_answers_are_cached_per_checkpoint_and_equal_a_fresh_sampling(tiny_model_dir, adapters, tmp_path,
                                                                            monkeypatch):
    model, tok = load_model(tiny_model_dir)
    calls = []
    real = behavior.sample_rows
    monkeypatch.setattr(behavior, "sample_rows",
                        lambda *a, **k: calls.append(sorted({r["kind"] for r in a[2]})) or real(*a, **k))
    cache, two = tmp_path / "cache", load_traits(["honesty", "sycophancy"])
    first = sample_trait_answers(model, tok, two, settings(), runs(adapters)[:2], cache)
    assert calls == [["trait:honesty", "trait:sycophancy"]] * 2  # one sampling per checkpoint, every trait in it
    calls.clear()
    grown = sample_trait_answers(model, tok, two, settings(), runs(adapters), cache)  # a new checkpoint
    assert len(calls) == 1 and grown[: len(first)] == first  # only it was sampled
    assert grown == sample_trait_answers(model, tok, two, settings(), runs(adapters), tmp_path / "fresh")
    # a trait added changes every checkpoint's rows: all are sampled again, and equal a fresh sampling
    calls.clear()
    three = load_traits(["honesty", "sycophancy", "confidence"])
    added = sample_trait_answers(model, tok, three, settings(), runs(adapters), cache)
    assert len(calls) == 3 and {r["kind"] for r in added} == {f"trait:{t}" for t in three}
    assert added == sample_trait_answers(model, tok, three, settings(), runs(adapters), tmp_path / "fresh3")
    by_step = {r["step"]: r["answer"] for r in added if r["sample"] == 0 and r["kind"] == "trait:honesty"}
    assert len(set(by_step.values())) > 1  # the adapters were applied (answers differ between checkpoints)


def test_a_retrained_adapter_is_sampled_again(tiny_model_dir, adapters, tmp_path):
    model, tok = load_model(tiny_model_dir)
    traits = load_traits(["honesty"])
    run = [runs(adapters)[1]]
    sample_trait_answers(model, tok, traits, settings(), run, tmp_path / "cache")
    other = [(run[0][0], adapters[1])]  # same run name, other weights: the cache keys by the weights
    again = sample_trait_answers(model, tok, traits, settings(), other, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.jsonl"))) == 2 and all(r["step"] == 1 for r in again)


def test_adapter_applied_leaves_the_base_untouched(tiny_model_dir, adapters):
    model, _ = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        plain = model(ids).logits
        with adapter_applied(model, adapters[0]) as applied:
            changed = applied(ids).logits
        after = model(ids).logits
    assert not torch.allclose(plain, changed) and torch.equal(plain, after)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
