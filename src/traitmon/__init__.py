"""traitmon: trait-space monitoring of LoRA finetuning for emergent misalignment.

Layer index convention, used everywhere in traitmon (config, files, code, figures):
``hidden_states`` indexing, where layer 0 is the embedding output and layer ``i`` (1 <= i <= L)
is the output of decoder block ``i - 1``; layer ``L`` has the final norm applied, as in
transformers' ``output_hidden_states``.
"""

__version__ = "0.1.0"

LAYER_CONVENTION = "hidden_states indexing: 0 = embeddings, i = output of decoder block i-1, L = after final norm"


def __getattr__(name: str):
    # traitmon.TraitMonitorCallback without importing transformers on every `import traitmon`
    if name in ("TraitMonitorCallback", "MonitorBundle"):
        from traitmon import live

        return getattr(live, name)
    raise AttributeError(name)
