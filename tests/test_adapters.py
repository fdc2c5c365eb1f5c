"""Adapters on a base model: refused in one line when trained for another shape, applied unmerged, and the
three drift paths (workflow capture, `traitmon watch`, the Trainer callback) agreeing on one adapter."""

import json

import pytest
import torch

from traitmon.errors import TraitmonError
from traitmon.models import attach_adapter, build_random_model, load_model

OTHER_SHAPE = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
               "num_key_value_heads": 2, "seed": 1}


def _save_adapter(model, folder, seed=0):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(folder)
    return folder


def test_adapter_for_another_base_shape_is_a_one_line_error(tiny_model_dir, tmp_path):
    other, _ = build_random_model(OTHER_SHAPE)
    adapter = _save_adapter(other, tmp_path / "other-adapter")
    for attempt in (lambda: load_model(tiny_model_dir, adapter=str(adapter)),
                    lambda: attach_adapter(load_model(tiny_model_dir)[0], adapter)):
        with pytest.raises(TraitmonError) as err:
            attempt()
        message = str(err.value)
        assert "\n" not in message and str(adapter) in message
        assert "48" in message and "32" in message  # the adapter's and the model's shapes


def test_adapter_is_applied_unmerged_and_matches_the_trained_model(tiny_model_dir, tmp_path):
    model, _ = load_model(tiny_model_dir)
    adapter = _save_adapter(model, tmp_path / "adapter")
    loaded, _ = load_model(tiny_model_dir, adapter=str(adapter))
    assert hasattr(loaded, "peft_config")  # unmerged: no rounding of base + update into the stored dtype
    ids = torch.tensor([[5, 6, 7, 8]])
    base, _ = load_model(tiny_model_dir)
    with torch.no_grad():
        assert not torch.allclose(loaded(ids).logits, base(ids).logits)


def _random_direction_stores(folder, traits, layers, hidden, seed=0):
    """Direction stores as `traitmon extract` writes them (a unit vector at the chosen layer), random here:
    the agreement of the three paths does not depend on what the directions are."""
    import numpy as np
    import xarray as xr

    from traitmon.store import write_dataset

    rng = np.random.default_rng(seed)
    paths = []
    for trait, layer in zip(traits, layers):
        vector = rng.normal(size=(1, hidden)).astype(np.float32)
        ds = xr.Dataset({"direction": (("layer", "hidden"), vector / np.linalg.norm(vector))}, coords={"layer": [layer]},
                        attrs={"trait": trait, "chosen_layer": layer})
        paths.append(str(write_dataset(ds, folder / f"{trait}.zarr")))
    return paths


def _train_with_callback(model_dir, bundle_dir, run_dir, steps, lr=2e-4, max_length=64):
    """A real LoRA finetune watched by TraitMonitorCallback; saves checkpoint-{steps}."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from traitmon import MonitorBundle, TraitMonitorCallback
    from traitmon.chat import AssistantOnlyCollator, encode_training_example
    from traitmon.perturbations import load_domain, written_rows

    bundle = MonitorBundle.load(bundle_dir)
    model, tok = load_model(model_dir, bundle.model_dtype)
    bundle.check_model(model, bundle_dir)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    rows = written_rows(load_domain("medical"), "em", 2 * steps, seed=0)
    data = [encode_training_example(tok, r["messages"], max_length) for r in rows]
    args = TrainingArguments(output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=lr, lr_scheduler_type="constant", save_steps=steps,
                             save_strategy="steps", save_only_model=True, logging_steps=1, report_to=[],
                             use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=AssistantOnlyCollator(tok.pad_token_id))
    callback = TraitMonitorCallback(bundle, tok, every=0, on_save=True).attach(trainer)
    trainer.train()
    (entry,) = callback.history
    assert entry["step"] == steps
    return bundle, entry


def _drift_three_ways(model_dir, tmp_path, model_dtype: str, hidden: int, layers: list[int], lr: float = 2e-4,
                      max_length: int = 64) -> dict:
    """One adapter's drift from the live callback, from ``watch`` and from offline captures, the base loaded in
    ``model_dtype`` everywhere (as a study's config gives it)."""
    import numpy as np

    from traitmon.cli import main
    from traitmon.drift import drift_scale, load_directions, project
    from traitmon.store import open_dataset
    from traitmon.watcher import watch

    traits, steps, batch = ["honesty", "sycophancy", "power-seeking"], 2, 8
    directions = _random_direction_stores(tmp_path, traits, layers, hidden=hidden)
    bundle_dir = tmp_path / "bundle"
    assert main(["bundle", "--model-dir", str(model_dir), "--model-key", "m", "--directions", *directions,
                 "--per-trait-questions", "1", "--dtype", model_dtype, "--precision", "fp32",  # as the captures
                 "--batch-size", str(batch), "--out", str(bundle_dir)]) == 0
    bundle, live = _train_with_callback(model_dir, bundle_dir, tmp_path / "run", steps, lr, max_length)
    paths = {"callback": np.array([live[f"drift_{t}"] for t in traits])}

    (watched,) = watch(tmp_path / "run", model_dir, bundle, once=True, interval=0.2, printer=lambda _: None)
    paths["watch"] = np.array([watched[f"drift_{t}"] for t in traits])

    settings = {"per_trait_questions": 1, "layers": sorted(set(layers)), "reference_response": True,
                "batch_size": batch, "dtype": "float32", "precision": "fp32", "model_dtype": model_dtype}
    stores = {}
    for name, extra in (("base", []), ("ckpt", ["--adapter", str(tmp_path / f"run/checkpoint-{steps}")])):
        stores[name] = tmp_path / f"{name}.zarr"
        assert main(["capture", "--model-dir", str(model_dir), "--model-key", "m",
                     "--settings", json.dumps(settings), "--out", str(stores[name]), "--step",
                     "0", *extra]) == 0
    dirs = load_directions(directions, "response_mean")
    proj = {k: project(open_dataset(p, load=True)["response_mean"], dirs) for k, p in stores.items()}
    scale = drift_scale(proj["base"].transpose("prompt", "trait").values)  # the drift table's base-spread units
    paths["capture"] = ((proj["ckpt"] - proj["base"]) / scale).mean("prompt").sel(trait=traits).values
    return paths


def _assert_same_drift(paths: dict) -> None:
    import numpy as np

    norm = np.linalg.norm(paths["capture"])
    assert norm > 0  # the adapter moved the activations
    for name in ("callback", "watch"):
        gap = np.linalg.norm(paths[name] - paths["capture"])
        assert gap <= 0.01 * norm, f"{name} drift {paths[name]} vs capture {paths['capture']}: gap {gap / norm:.2%}"


@pytest.mark.smollm2
def test_capture_watch_and_callback_give_the_same_drift_for_one_adapter(smollm2_dir, tmp_path):
    """Issue: offline capture and watch merged the LoRA into the weights, the bundle loaded the base in the
    default dtype, left-padded batches had shifted positions. Same adapter -> same drift, within 1% of its norm,
    on the real model (float32: fast on every CPU; the bf16 path is the next test's)."""
    _assert_same_drift(_drift_three_ways(smollm2_dir, tmp_path, "float32", 576, [4, 8, 12]))


def test_live_watch_and_capture_agree_with_bfloat16_weights(tiny_model_dir, tmp_path):
    """The same three paths with the base in bfloat16, where merging a small LoRA update into the weights would
    round it away (it gave 82% disagreement on SmolLM2): a tiny model, so CPUs without native bf16 run it fast."""
    # byte-level tokens: 384 of them reach the answers
    _assert_same_drift(_drift_three_ways(tiny_model_dir, tmp_path, "bfloat16", 32, [1, 2, 3], 2e-4, 384))
