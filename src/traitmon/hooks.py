"""Forward hooks at ``hidden_states`` indices, always removed on exit.

Index ``i`` (see ``traitmon.LAYER_CONVENTION``) maps to a hook point:
0 -> input of decoder block 0 (embeddings, after any model-specific scaling such as Gemma's),
1..L-1 -> output of decoder block i-1, L -> output of the final norm. This reproduces exactly what
``output_hidden_states=True`` returns, without materialising every layer.
Decoder blocks return a bare tensor in recent transformers and a tuple in older ones: ``unwrap`` and
``rewrap`` handle both in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


def unwrap(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def rewrap(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def find_decoder(model: nn.Module) -> nn.Module:
    """The transformer stack (embeddings, blocks, final norm) under a CausalLM, peft-wrapped or not."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    if hasattr(model, "layers"):
        return model
    raise TypeError(f"cannot find decoder layers in {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks L; valid hidden-state indices are 0..L."""
    return len(find_decoder(model).layers)


def _hook_point(model: nn.Module, index: int) -> tuple[nn.Module, bool]:
    """(module, is_pre_hook) for a hidden_states index."""
    decoder = find_decoder(model)
    n = len(decoder.layers)
    if not 0 <= index <= n:
        raise IndexError(f"layer {index} out of range 0..{n} (hidden_states indexing)")
    if index == 0:
        return decoder.layers[0], True
    if index == n:
        return decoder.norm, False
    return decoder.layers[index - 1], False


def _pre_hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def record_layers(model: nn.Module, layers: list[int], fn: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(index, hidden[batch, seq, hidden])`` for each requested index during forward passes."""
    handles = []
    try:
        for index in layers:
            module, pre = _hook_point(model, index)
            if pre:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, kwargs, i=index: fn(i, _pre_hidden(args, kwargs)), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(lambda _m, _a, out, i=index: fn(i, unwrap(out))))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def add_to_layer(model: nn.Module, index: int, vector: torch.Tensor) -> Iterator[None]:
    """Add ``vector`` to the residual stream at hidden_states index ``index`` (every position)."""
    module, pre = _hook_point(model, index)

    def shift(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + vector.to(device=hidden.device, dtype=hidden.dtype)

    if pre:
        def pre_hook(_m, args, kwargs):
            if args:
                return (shift(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": shift(kwargs["hidden_states"])}
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda _m, _a, out: rewrap(out, shift(unwrap(out))))
    try:
        yield
    finally:
        handle.remove()
