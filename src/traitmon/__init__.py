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
         "TraitMonitorCallback": "callbacks", "watch": "watcher", "complete_checkpoints": "watcher",
         "AssistantOnlyCollator": "chat", "encode_training_example": "chat", "finetune": "finetune",
         "lora_config": "finetune", "FittedMonitor": "monitor", "load_config": "config", "load_model": "models",
         "StudySettings": "settings", "study_settings": "settings", "ModelSettings": "settings",
         "DirectionSettings": "settings", "SteeringSettings": "settings", "FinetuneSettings": "settings",
         "CaptureSettings": "settings", "BehaviorSettings": "settings", "AnalysisSettings": "settings",
         "JudgeSettings": "settings", "GuardSettings": "settings", "make_guard": "guard", "TraitmonError": "errors"}

__all__ = [
    "LAYER_CONVENTION",
    "AnalysisSettings",
    "AssistantOnlyCollator",
    "BehaviorSettings",
    "CaptureSettings",
    "DirectionSettings",
    "FinetuneSettings",
    "FittedMonitor",
    "GuardSettings",
    "JudgeSettings",
    "ModelSettings",
    "MonitorBundle",
    "SteeringSettings",
    "StudySettings",
    "TraitMonitorCallback",
    "TraitmonError",
    "__version__",
    "build_bundle",
    "complete_checkpoints",
    "encode_training_example",
    "finetune",
    "load_config",
    "load_model",
    "lora_config",
    "make_guard",
    "model_fingerprint",
    "study_settings",
    "watch",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"traitmon.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'traitmon' has no attribute {name!r}")
