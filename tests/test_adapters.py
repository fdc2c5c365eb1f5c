"""Adapters on a base model: refused in one line when trained for another shape, applied unmerged, and the
three drift paths (workflow capture, `traitmon watch`, the Trainer callback) agreeing on one adapter."""

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
