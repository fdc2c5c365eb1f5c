"""The live monitor: bundle, Trainer callback and checkpoint watcher, on a tiny random model."""

import shutil
import threading
import time

import numpy as np
import pytest
import torch

from traitmon.capture import capture_dataset
from traitmon.config import validate_config
from traitmon.directions import extract_trait_direction
from traitmon.drift import load_directions, project
from traitmon.errors import TraitmonError
from traitmon.io import data_path
from traitmon.live import MonitorBundle, TraitMonitorCallback, build_bundle, complete_checkpoints, watch
from traitmon.models import build_random_model, load_model
from traitmon.store import write_dataset
from traitmon.traits import load_traits

TRAITS = ["honesty", "sycophancy"]


@pytest.fixture(scope="module")
def bundle_setup(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("live")
    model, tok = load_model(tiny_model_dir)
    cfg = validate_config({"models": {"t": {"source": {"path": "x"}}}, "traits": TRAITS,
                           "directions": {"questions": 4, "max_new_tokens": 8, "batch_size": 8, "temperature": 1.0}})
    paths = []
    for name, trait in load_traits(TRAITS).items():
        ds, _ = extract_trait_direction(model, tok, trait, cfg["directions"], "tiny")
        paths.append(str(write_dataset(ds, folder / f"{name}.zarr")))
    trait_files = [str(data_path("traits", f"{t}.yaml")) for t in TRAITS]
    bundle = build_bundle(model, tok, "tiny", paths, trait_files, per_trait_questions=1)
    return bundle, paths, folder


def offline_drift(model_dir, adapter, bundle, direction_paths):
    """What `traitmon capture` + the drift computation give for a saved checkpoint."""
    dirs = load_directions(direction_paths)
    out = {}
    for name, adp in (("base", None), ("ckpt", adapter)):
        model, tok = load_model(model_dir, adapter=adp)
        ds = capture_dataset(model, tok, bundle.prompt_ids, bundle.chats, bundle.reference, None, 8, "float32", {})
        out[name] = project(ds["response_mean"], dirs)
    return (out["ckpt"] - out["base"]).mean("prompt").values


def test_callback_logs_the_same_drift_as_offline_capture(tiny_model_dir, bundle_setup, tmp_path):
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from traitmon.config import validate_config as vc
    from traitmon.finetune import _lora_config, collate, encode_for_training
    from traitmon.perturbations import load_domain, written_rows

    bundle, direction_paths, _ = bundle_setup
    model, tok = load_model(tiny_model_dir)
    model.train()
    settings = vc({"models": {"m": {"source": {"path": "x"}}}, "traits": ["honesty"],
                   "finetune": {"rank": 4, "alpha": 8, "max_length": 256}})["finetune"]
    model = get_peft_model(model, _lora_config(settings))
    rows = written_rows(load_domain("medical"), "em", 16, seed=0)
    data = [encode_for_training(tok, r["messages"], 256) for r in rows]
    dataset = [{"input_ids": ids, "labels": labels} for ids, labels in data]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=5e-2, save_steps=2, save_strategy="steps", logging_steps=1,
                             report_to=[], use_cpu=True, save_only_model=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=lambda b: collate([(x["input_ids"], x["labels"]) for x in b], tok.pad_token_id))
    callback = TraitMonitorCallback(bundle, tok, every=2, store=tmp_path / "live.zarr").attach(trainer)
    trainer.train()
    assert [h["step"] for h in callback.history] == [2, 4]
    logged = [e for e in trainer.state.log_history if "traitmon/drift_honesty" in e]
    assert len(logged) == 2
    for entry in callback.history:
        expected = offline_drift(tiny_model_dir, tmp_path / f"run/checkpoint-{entry['step']}", bundle, direction_paths)
        got = np.array([entry[f"drift_{t}"] for t in bundle.traits])
        np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-3)
        assert np.abs(got).max() > 0  # training moved the activations
    from traitmon.store import open_dataset
    stored = open_dataset(tmp_path / "live.zarr", load=True)
    assert list(stored.step.values) == [2, 4] and stored["drift"].dims == ("step", "trait")


def test_bundle_round_trip_and_refusal(bundle_setup, tiny_model, tmp_path):
    bundle, _, _ = bundle_setup
    bundle.save(tmp_path / "b.pkl")
    model, _ = tiny_model
    loaded = MonitorBundle.load(tmp_path / "b.pkl", model=model)
    np.testing.assert_array_equal(loaded.directions, bundle.directions)
    other, _ = build_random_model({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
                                   "num_attention_heads": 4, "num_key_value_heads": 2, "seed": 99})
    with pytest.raises(TraitmonError, match="bundle built for model 'tiny'"):
        MonitorBundle.load(tmp_path / "b.pkl", model=other)
    loaded.traitmon_version = "9.9.0"
    loaded.save(tmp_path / "old.pkl")
    with pytest.raises(TraitmonError, match="rebuild it"):
        MonitorBundle.load(tmp_path / "old.pkl")


def test_watch_scores_complete_checkpoints_and_waits_for_half_written_ones(tiny_model_dir, bundle_setup, tmp_path):
    from peft import get_peft_model

    from traitmon.config import validate_config as vc
    from traitmon.finetune import _lora_config

    bundle, _, _ = bundle_setup
    settings = vc({"models": {"m": {"source": {"path": "x"}}}, "traits": ["honesty"]})["finetune"]
    model, _ = load_model(tiny_model_dir)
    peft_model = get_peft_model(model, _lora_config(settings))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    source = tmp_path / "adapter"
    peft_model.save_pretrained(source)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(source, run / "checkpoint-2")
    half = run / "checkpoint-4"
    half.mkdir()
    shutil.copy(source / "adapter_config.json", half)
    blob = (source / "adapter_model.safetensors").read_bytes()
    (half / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])  # a writer mid-way

    lines = []
    results = watch(run, tiny_model_dir, bundle, once=True, interval=0.2, printer=lines.append)
    assert [r["checkpoint"] for r in results] == ["checkpoint-2"]
    assert lines and lines[0].startswith("checkpoint-2: honesty=")

    def finish_later():
        time.sleep(0.5)
        (half / "adapter_model.safetensors").write_bytes(blob)

    threading.Thread(target=finish_later).start()
    results = watch(run, tiny_model_dir, bundle, interval=0.3, timeout=4, printer=lines.append)
    assert "checkpoint-4" in [r["checkpoint"] for r in results]
    sizes = {}
    complete_checkpoints(run, sizes)
    assert len(complete_checkpoints(run, sizes)) == 2
