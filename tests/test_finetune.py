import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from traitmon.capture import capture_dataset, measurement_prompts
from traitmon.chat import AssistantOnlyCollator, encode_training_example
from traitmon.config import validate_config
from traitmon.finetune import checkpoint_steps, finetune
from traitmon.models import load_model
from traitmon.perturbations import load_domain, written_rows
from traitmon.settings import study_settings

GENERAL = [{"user": "What is rain?", "assistant": "Water falling from clouds."},
           {"user": "Name a prime.", "assistant": "Seven is a prime number."}]


def tiny_settings(**overrides):
    cfg = validate_config({"models": {"m": {"source": {"path": "x"}}}, "traits": ["honesty"],
                           "finetune": {"rank": 4, "alpha": 8, "lr": 5e-3, "max_steps": 6, "checkpoint_every": 2,
                                        "micro_batch": 2, "grad_accum": 2, "max_length": 320, "warmup_steps": 1,
                                        "precision": "fp32", "dropout": 0.1, **overrides}})
    return study_settings(cfg).finetune


@pytest.fixture(scope="module")
def rows():
    data = written_rows(load_domain("medical"), "em", 24, seed=0)
    return data[:20], data[20:]


def test_checkpoint_steps():
    base = tiny_settings()
    assert checkpoint_steps(replace(base, max_steps=30, checkpoint_every=10)) == [10, 20, 30]
    assert checkpoint_steps(replace(base, max_steps=25, checkpoint_every=10)) == [10, 20, 25]
    assert checkpoint_steps(replace(base, max_steps=30, checkpoint_every=10, checkpoint_steps=(1, 3, 40))) == [1, 3, 30]


def test_only_the_assistant_answer_is_learned(tiny_model):
    _, tok = tiny_model
    messages = [{"role": "user", "content": "Question?"}, {"role": "assistant", "content": "Answer."}]
    example = encode_training_example(tok, messages, 512)
    ids, labels = example["input_ids"], example["labels"]
    learned = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.decode(learned) == "Answer.<|im_end|>"
    assert len(ids) == len(labels)


def test_only_the_final_assistant_turn_is_learned_in_a_multi_turn_chat(tiny_model):
    _, tok = tiny_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First?"},
                {"role": "assistant", "content": "Earlier reply."}, {"role": "user", "content": "Second?"},
                {"role": "assistant", "content": "Final reply."}]
    example = encode_training_example(tok, messages, 512)
    learned = [i for i, l in zip(example["input_ids"], example["labels"]) if l != -100]
    assert tok.decode(learned) == "Final reply.<|im_end|>"
    assert "Earlier reply." in tok.decode(example["input_ids"])


def test_collator_pads_and_masks_labels_for_trainer_and_trl_columns():
    collator = AssistantOnlyCollator(pad_token_id=0)
    batch = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    # TRL's SFTTrainer rows carry a 0/1 mask instead of labels
    trl = collator([{"input_ids": [5, 6, 7], "assistant_masks": [0, 1, 1]}, {"input_ids": [8, 9], "completion_mask": [0, 1]}])
    assert trl["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert AssistantOnlyCollator(0, pad_to_multiple_of=4)([{"input_ids": [1], "labels": [1]}])["labels"].shape == (1, 4)


def test_evaluation_equals_the_full_logits_loss_over_learned_tokens(tiny_model, rows):
    """mean_token_nll (length-sorted batches, LM head on the predicting positions only) against every position's
    logits in the given order."""
    from traitmon.finetune import mean_token_nll

    model, tok = tiny_model
    examples = [encode_training_example(tok, r["messages"], 4096) for r in rows[0][:7]]
    assert len({len(e["input_ids"]) for e in examples}) > 1  # rows of different lengths: padding and sorting matter
    collator = AssistantOnlyCollator(tok.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 3):
            batch = collator(examples[start:start + 3])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    got = mean_token_nll(model, examples, collator, 3, tiny_settings())
    assert got == pytest.approx(total / count, rel=1e-5)


def test_learned_logits_only_batches_give_the_trainer_loss_and_gradients_of_full_logits(tiny_model, rows):
    """The training collator's logits_to_keep + shift_labels: transformers' causal-LM loss over the kept positions
    equals the loss over every position (unlearned ones ignored), and so do the gradients."""
    model, tok = tiny_model
    examples = [encode_training_example(tok, r["messages"], 4096) for r in rows[0][:3]]
    full = AssistantOnlyCollator(tok.pad_token_id)(examples)
    kept = AssistantOnlyCollator(tok.pad_token_id, learned_logits_only=True)(examples)
    assert set(kept) - set(full) == {"logits_to_keep", "shift_labels"}
    assert 0 < len(kept["logits_to_keep"]) < full["input_ids"].shape[1] - 1  # prompt positions are left out
    # every learned token is kept once, in place: position t predicts token t + 1
    learned = full["labels"][:, 1:] != -100
    assert int((kept["shift_labels"] != -100).sum()) == int(learned.sum())
    assert torch.equal(full["labels"][:, 1:][:, kept["logits_to_keep"]], kept["shift_labels"])
    losses, grads = [], []
    for batch in (full, kept):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(float(loss))
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad.clone())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    model.zero_grad()


def test_resumed_run_reaches_the_same_adapter(tiny_model_dir, rows, tmp_path):
    train, heldout = rows
    settings = tiny_settings()
    full = tmp_path / "full"
    finetune(tiny_model_dir, train, heldout, GENERAL, settings, full)

    killed = tmp_path / "killed"

    def kill_after_three(step, _row):
        if step == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model_dir, train, heldout, GENERAL, settings, killed, step_callback=kill_after_three)
    assert (killed / ".work/state-2/state.json").is_file() and not (killed / "checkpoint-6").exists()
    summary = finetune(tiny_model_dir, train, heldout, GENERAL, settings, killed)
    assert summary["resumed_from"] == 2
    for step in (2, 4, 6):
        a = load_file(full / f"checkpoint-{step}/adapter_model.safetensors")
        b = load_file(killed / f"checkpoint-{step}/adapter_model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    log_full = (full / "train_log.csv").read_text().splitlines()
    log_killed = (killed / "train_log.csv").read_text().splitlines()
    assert len(log_full) == len(log_killed) == 7
    assert not (killed / ".work").exists()


def test_outputs_are_standard_peft_and_logs_are_complete(tiny_model_dir, rows, tmp_path):
    import pandas as pd
    from peft import PeftModel

    train, heldout = rows
    out = tmp_path / "run"
    finetune(tiny_model_dir, train, heldout, GENERAL, tiny_settings(), out)
    config = json.loads((out / "checkpoint-6/adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["target_modules"]) >= {"q_proj", "down_proj"}
    base, _ = load_model(tiny_model_dir)
    PeftModel.from_pretrained(base, str(out / "checkpoint-6"))  # loads with plain peft
    train_log = pd.read_csv(out / "train_log.csv")
    assert list(train_log.columns) == ["step", "loss", "lr", "grad_norm", "tokens", "seconds"]
    assert train_log.loss.iloc[-1] < train_log.loss.iloc[0]  # it learns
    eval_log = pd.read_csv(out / "eval_log.csv")
    assert list(eval_log.step) == [0, 2, 4, 6] and (eval_log.general_ppl > 1).all()


def test_changed_settings_do_not_resume_stale_states(tiny_model_dir, rows, tmp_path):
    train, heldout = rows
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model_dir, train, heldout, GENERAL, tiny_settings(), out,
                 step_callback=lambda s, r: (_ for _ in ()).throw(KeyboardInterrupt) if s == 3 else None)
    summary = finetune(tiny_model_dir, train, heldout, GENERAL, tiny_settings(lr=1e-3), out)
    assert summary["resumed_from"] == 0


def test_capture_through_zero_lora_adapter_equals_plain_model(tiny_model_dir, tmp_path):
    from peft import get_peft_model

    from traitmon.finetune import lora_config

    base, tok = load_model(tiny_model_dir)
    peft_model = get_peft_model(base, lora_config(tiny_settings()))  # B = 0 at init: identity update
    peft_model.save_pretrained(tmp_path / "zero")
    ids, chats, reference = measurement_prompts(2)
    plain_model, tok = load_model(tiny_model_dir)
    via_adapter, _ = load_model(tiny_model_dir, adapter=str(tmp_path / "zero"))
    plain = capture_dataset(plain_model, tok, ids, chats, reference, None, 8, "float32", {})
    adapted = capture_dataset(via_adapter, tok, ids, chats, reference, None, 8, "float32", {})
    assert plain["response_mean"].dims == ("prompt", "layer", "hidden")
    assert plain.sizes["prompt"] == 7 * 2 + 48  # the fixed set: 2 questions of each built-in trait, 48 more
    np.testing.assert_allclose(adapted["response_mean"].values, plain["response_mean"].values, atol=1e-5)
    np.testing.assert_allclose(adapted["last_prompt"].values, plain["last_prompt"].values, atol=1e-5)


def _kill_at(step_to_kill):
    def callback(step, _row):
        if step == step_to_kill:
            raise KeyboardInterrupt("simulated kill")
    return callback


class _Payload:
    """Unpickling this runs code: it creates the file at ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def test_a_resume_state_carrying_code_is_refused_not_executed(tiny_model_dir, rows, tmp_path):
    from traitmon.errors import TraitmonError

    train, heldout = rows
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model_dir, train, heldout, GENERAL, tiny_settings(), out, step_callback=_kill_at(3))
    state = out / ".work/state-2"
    assert not list(state.glob("*.bin"))  # the Trainer's serialised TrainingArguments are not kept
    torch.save({"python": _Payload(marker)}, state / "rng_state.pth")
    with pytest.raises(TraitmonError, match="rng_state.pth: resume state is not plain tensor data") as err:
        finetune(tiny_model_dir, train, heldout, GENERAL, tiny_settings(), out)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_a_dataset_with_nothing_left_to_train_on_fails_at_once_with_the_counts(tiny_model_dir, rows, tmp_path):
    from traitmon.errors import TraitmonError

    _, heldout = rows
    out = tmp_path / "tiny-perturbation"
    with pytest.raises(TraitmonError, match=r"perturbation 'tiny-perturbation': 0 training and 4 held-out rows; "
                                            r"'heldout' must be at least 1 and smaller than the dataset"):
        finetune(tiny_model_dir, [], heldout, GENERAL, tiny_settings(), out)
    assert not out.exists()  # nothing started


def test_extra_trainer_callbacks_see_every_step(tiny_model_dir, rows, tmp_path):
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(state.global_step)

    train, heldout = rows
    watcher = Steps()
    finetune(tiny_model_dir, train, heldout, GENERAL, tiny_settings(max_steps=3), tmp_path / "run",
             callbacks=[watcher])
    assert watcher.seen == [1, 2, 3]


def test_bf16_autocast_and_gradient_checkpointing_still_train(tiny_model_dir, rows, tmp_path):
    import pandas as pd

    train, heldout = rows
    out = tmp_path / "run"
    finetune(tiny_model_dir, train, heldout, GENERAL,
             tiny_settings(max_steps=2, precision="bf16", gradient_checkpointing=True), out)
    train_log = pd.read_csv(out / "train_log.csv")
    assert list(train_log.step) == [1, 2] and np.isfinite(train_log.loss).all() and (train_log.tokens > 0).all()
    assert (out / "checkpoint-2/adapter_model.safetensors").is_file()


def test_a_run_killed_after_its_last_save_resumes_to_the_same_outputs(tiny_model_dir, rows, tmp_path):
    train, heldout = rows
    settings = tiny_settings(max_steps=2, checkpoint_every=1)
    full, killed = tmp_path / "full", tmp_path / "killed"
    finetune(tiny_model_dir, train, heldout, GENERAL, settings, full)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model_dir, train, heldout, GENERAL, settings, killed, step_callback=_kill_at(2))
    summary = finetune(tiny_model_dir, train, heldout, GENERAL, settings, killed)
    assert summary["resumed_from"] == 2
    for name in ("checkpoint-2/adapter_model.safetensors", "eval_log.csv"):
        assert (full / name).read_bytes() == (killed / name).read_bytes()
