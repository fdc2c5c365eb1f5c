"""traitmon: trait-space monitoring of LoRA finetuning for emergent misalignment.

Layer index convention, used everywhere in traitmon (config, files, code, figures):
``hidden_states`` indexing, where layer 0 is the embedding output and layer ``i`` (1 <= i <= L)
is the output of decoder block ``i - 1``; layer ``L`` has the final norm applied, as in
transformers' ``output_hidden_states``.
"""

__version__ = "0.1.0"

LAYER_CONVENTION = "hidden_states indexing: 0 = embeddings, i = output of decoder block i-1, L = after final norm"


# Public names loaded on first use: ``import traitmon`` stays light (no torch/transformers import).
_LAZY = {"MonitorBundle": "bundle", "build_bundle": "bundle", "model_fingerprint": "bundle",
         "TraitMonitorCallback": "callbacks", "watch": "watcher", "complete_checkpoints": "watcher"}

__all__ = ["LAYER_CONVENTION", "MonitorBundle", "TraitMonitorCallback", "__version__", "build_bundle",
           "complete_checkpoints", "model_fingerprint", "watch"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"traitmon.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'traitmon' has no attribute {name!r}")
