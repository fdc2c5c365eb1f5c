import numpy as np
import pytest
import torch

from traitmon.capture import capture, capture_batch
from traitmon.chat import encode_chats
from traitmon.hooks import add_to_layer, num_layers, record_layers, rewrap, unwrap

CHATS = [[{"role": "user", "content": "Hello there, how are you?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]
ANSWERS = ["I am fine, thanks.", "Blue."]


def test_unwrap_and_rewrap_handle_tensor_and_tuple():
    h = torch.ones(2, 3)
    assert unwrap(h) is h
    assert unwrap((h, "cache")) is h
    new = torch.zeros(2, 3)
    assert rewrap(h, new) is new
    out = rewrap((h, "cache", 1), new)
    assert out[0] is new and out[1:] == ("cache", 1)


class TupleBlock(torch.nn.Module):
    """A decoder block in the style of older transformers: returns (hidden, extra)."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, hidden_states, **kwargs):
        return hidden_states * self.scale, None


class ToyDecoder(torch.nn.Module):
    def __init__(self, tuple_blocks: bool):
        super().__init__()
        blocks = [TupleBlock(s) for s in (2.0, 3.0)]
        if not tuple_blocks:
            for b in blocks:
                b.forward = lambda hidden_states, b=b, **k: hidden_states * b.scale
        self.layers = torch.nn.ModuleList(blocks)
        self.norm = torch.nn.Identity()

    def forward(self, x):
        for block in self.layers:
            x = unwrap(block(x))
        return self.norm(x)


@pytest.mark.parametrize("tuple_blocks", [True, False])
def test_hooks_handle_tensor_and_tuple_block_outputs(tuple_blocks):
    toy = ToyDecoder(tuple_blocks)
    x = torch.ones(1, 2, 3)
    seen = {}
    with record_layers(toy, [0, 1, 2], lambda i, h: seen.__setitem__(i, h.clone())):
        toy(x)
    torch.testing.assert_close(seen[0], x)          # 0 = input of the first block
    torch.testing.assert_close(seen[1], 2 * x)      # 1 = output of block 0
    torch.testing.assert_close(seen[2], 6 * x)      # L = after the final norm
    with add_to_layer(toy, 1, torch.ones(3)):
        out = toy(x)
    torch.testing.assert_close(out, (2 * x + 1) * 3)
    torch.testing.assert_close(toy(x), 6 * x)       # hook removed on exit


def test_hook_indices_match_output_hidden_states(tiny_model):
    model, tok = tiny_model
    batch = encode_chats(tok, CHATS, ANSWERS)
    L = num_layers(model)
    with torch.no_grad():
        reference = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                output_hidden_states=True).hidden_states
    assert len(reference) == L + 1
    seen = {}
    with torch.no_grad(), record_layers(model, list(range(L + 1)), lambda i, h: seen.__setitem__(i, h.clone())):
        model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for i in range(L + 1):
        torch.testing.assert_close(seen[i], reference[i])


def test_capture_pools_response_tokens_and_last_prompt_token(tiny_model):
    model, tok = tiny_model
    batch = encode_chats(tok, CHATS, ANSWERS)
    layers = [0, 2, num_layers(model)]
    pooled = capture_batch(model, batch, layers)
    with torch.no_grad():
        hs = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         output_hidden_states=True).hidden_states
    for b in range(2):
        mask = batch.response_mask[b].bool()
        assert mask.sum() == len(tok(ANSWERS[b], add_special_tokens=False)["input_ids"])
        for j, layer in enumerate(layers):
            torch.testing.assert_close(pooled["response_mean"][b, j], hs[layer][b, mask].mean(0))
            torch.testing.assert_close(pooled["last_prompt"][b, j], hs[layer][b, batch.last_prompt[b]])


def test_capture_is_independent_of_batching_and_early_stop(tiny_model):
    model, tok = tiny_model
    one_by_one = capture(model, tok, CHATS, ANSWERS, [1, 2], batch_size=1)
    together = capture(model, tok, CHATS, ANSWERS, [1, 2], batch_size=2)
    full = capture(model, tok, CHATS, ANSWERS, list(range(num_layers(model) + 1)), batch_size=2)
    np.testing.assert_allclose(one_by_one["response_mean"], together["response_mean"], atol=1e-4)
    np.testing.assert_allclose(together["last_prompt"], full["last_prompt"][:, 1:3], atol=1e-5)


def test_bf16_precision_computes_under_autocast_close_to_float32(tiny_model):
    from traitmon.errors import TraitmonError

    model, tok = tiny_model
    fp32 = capture(model, tok, CHATS, ANSWERS, [1, 2], precision="fp32")["response_mean"]
    bf16 = capture(model, tok, CHATS, ANSWERS, [1, 2], precision="bf16")["response_mean"]
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)  # the passes really ran in bf16
    np.testing.assert_allclose(bf16, fp32, atol=0.03 * np.abs(fp32).max())  # a few bf16 roundings, no more
    assert next(model.parameters()).dtype == torch.float32  # weights are not cast
    with pytest.raises(TraitmonError, match="precision 'fp16'"):
        capture(model, tok, CHATS, ANSWERS, [1], precision="fp16")


def test_steering_adds_the_vector_at_the_index(tiny_model):
    model, tok = tiny_model
    batch = encode_chats(tok, CHATS[:1], ANSWERS[:1])
    vec = torch.randn(model.config.hidden_size)
    for layer in (0, 1, num_layers(model) - 1):
        base = capture_batch(model, batch, [layer])["last_prompt"]
        with add_to_layer(model, layer, vec):
            steered = capture_batch(model, batch, [layer])["last_prompt"]
        torch.testing.assert_close(steered - base, vec.expand_as(base), atol=1e-4, rtol=1e-4)
    # the hook is gone afterwards
    torch.testing.assert_close(capture_batch(model, batch, [1])["last_prompt"],
                               capture_batch(model, batch, [1])["last_prompt"])


def test_left_padded_rows_see_the_positions_they_see_alone(tiny_model):
    """Under left padding each prompt's real tokens must sit at positions 0..n-1, as when it runs alone (the
    rotary embedding sees absolute positions: in bf16 shifted positions round differently)."""
    model, tok = tiny_model
    chats = [CHATS[0], [{"role": "user", "content": "Hi"}]]
    answers = [ANSWERS[0] * 3, "Ok."]  # very different lengths: row 1 is heavily padded
    seen = []

    def record(_module, args, kwargs):
        seen.append((kwargs.get("position_ids") if "position_ids" in kwargs else args[1]).clone())

    decoder = model.model
    handle = decoder.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
    try:
        batch = encode_chats(tok, chats, answers)
        together = capture_batch(model, batch, [1, 2])
        alone = [capture_batch(model, encode_chats(tok, [c], [a]), [1, 2]) for c, a in zip(chats, answers)]
    finally:
        handle.remove()
    positions = seen[0].expand(2, -1)
    for b in range(2):
        real = batch.attention_mask[b].bool()
        assert positions[b, real].tolist() == list(range(int(real.sum())))
        assert seen[1 + b][0].tolist() == list(range(int(real.sum())))
        for key in ("response_mean", "last_prompt"):
            torch.testing.assert_close(together[key][b], alone[b][key][0], atol=1e-5, rtol=1e-4)


def tiny_of(architecture: str):
    """A tiny random model of one of the paper's four architectures (Gemma-2: sliding-window and global layers,
    soft-capping, scaled embeddings)."""
    import transformers

    from traitmon.models import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.padding_side = "left"
    common = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "pad_token_id": tok.pad_token_id}
    extra = {"Gemma2": {"head_dim": 8, "sliding_window": 16}, "Mistral": {"sliding_window": 64}}.get(architecture, {})
    config = getattr(transformers, f"{architecture}Config")(**common, **extra)
    torch.manual_seed(0)
    return getattr(transformers, f"{architecture}ForCausalLM")(config).eval(), tok


@pytest.mark.parametrize("architecture", ["Llama", "Mistral", "Qwen2", "Gemma2"])
def test_a_shared_prefix_run_once_gives_the_full_passes_activations(architecture, monkeypatch):
    import traitmon.capture as capture_module

    model, tok = tiny_of(architecture)
    system = {"role": "system", "content": "You are a careful assistant who answers briefly and plainly."}
    chats = [[system, {"role": "user", "content": q}] for q in
             ("Hi?", "What is the capital of France, please?", "Name a colour.", "Why is the sky blue at noon?")]
    answers = ["Hello.", "Paris is the capital.", "Blue.", "Rayleigh scattering of short wavelengths by air."]
    runs = []
    monkeypatch.setattr(capture_module, "run_prefix",
                        lambda *a, _real=capture_module.run_prefix: runs.append(a[1]) or _real(*a))
    layers = [0, 2, 3]
    full = capture(model, tok, chats, answers, layers, batch_size=3, share_prefix=False)
    shared = capture(model, tok, chats, answers, layers, batch_size=3)
    assert len(runs) == 1 and len(runs[0]) >= 40  # the system prompt and headers ran once
    for key in full:
        np.testing.assert_allclose(shared[key], full[key], rtol=1e-4, atol=1e-5)


def test_shared_prefix_length_and_skip():
    from traitmon.chat import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[7, 8], [7, 8]]) == 2
    assert shared_prefix_length([[1], [2]]) == 0


def test_skipping_a_whole_prompt_is_refused(tiny_model):
    _, tok = tiny_model
    with pytest.raises(ValueError, match="cannot skip"):
        encode_chats(tok, CHATS[:1], None, skip=10_000)
