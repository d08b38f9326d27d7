"""The CLIP model: fused vs explicit attention, returned maps, partial queries, text
truncation, architecture from shapes, strict loading and checkpoint formats (SPEC §2)."""
from __future__ import annotations

import copy
import functools
import math
import pickle

import helpers
import numpy as np
import pytest
import torch
from helpers import save_torchscript

import clip
from clip import build_model, tokenize
from clip.intermediates import attention_parts
from clip.kernels import ALL_AT_ONCE, CPU_ATTENTION, AttentionSchedule, Linear, input_gradient, packing_supported
from clip.kernels import linear as model_linear
from clip.model import Attention, ResidualAttentionBlock
from tagclip.method import region_masks, self_only_masks
from toolkit.errors import InputError

ATOL = 1e-5
WEIGHTS_ATOL = 1e-6
# float32 model vs the float64 hand computation of one attention layer with peaked maps
# (inputs of magnitude ~4): float32 rounding alone reaches ~1e-5 there.
HAND_ATOL = 5e-5
WIDTH, HEADS, TOKENS, BATCH = 128, 4, 11, 3


def _attention(seed: int = 0, width: int = WIDTH, heads: int = HEADS) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(width, heads)
    with torch.no_grad():
        attn.in_proj_weight.normal_(0.0, 2.5 * width ** -0.5)
        attn.in_proj_bias.normal_(0.0, 0.05)
        attn.out_proj.weight.normal_(0.0, width ** -0.5)
        attn.out_proj.bias.normal_(0.0, 0.05)
    return attn.eval()


def _tokens(seed: int = 1, batch: int = BATCH, n: int = TOKENS, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(batch, n, width, generator=torch.Generator().manual_seed(seed))


def _off_diagonal(n: int, value: float = -100.0) -> torch.Tensor:
    return (1 - torch.eye(n)) * value


def _per_sample_mask(batch: int = BATCH, n: int = TOKENS) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.where(torch.rand(batch, 1, n, n, generator=g) < 0.4, -1000.0, 0.0)


def _hand_attention(attn: Attention, x: torch.Tensor, mask=None, causal: bool = False):
    """Explicit multi-head attention in float64: (output, unmasked head-averaged softmax)."""
    x = x.double()
    w, b = attn.in_proj_weight.double(), attn.in_proj_bias.double()
    q, k, v = (x @ w.t() + b).chunk(3, dim=-1)
    bsz, n, width = x.shape
    hd = width // attn.heads

    def split(t):
        return t.reshape(bsz, n, attn.heads, hd).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
    weights = scores.softmax(dim=-1).mean(dim=1)
    masked = scores
    if causal:
        masked = masked.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        masked = masked + mask.double()
    out = (masked.softmax(dim=-1) @ v).transpose(1, 2).reshape(bsz, n, width)
    out = out @ attn.out_proj.weight.double().t() + attn.out_proj.bias.double()
    return out, weights


MASK_CASES = {
    "none": dict(mask=None, causal=False),
    "off_diagonal_-100": dict(mask=_off_diagonal(TOKENS), causal=False),
    "per_sample": dict(mask=_per_sample_mask(), causal=False),
    "causal": dict(mask=None, causal=True),
}


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("case", list(MASK_CASES))
def test_fused_and_explicit_attention_agree(case):
    attn, x = _attention(), _tokens()
    mask, causal = MASK_CASES[case]["mask"], MASK_CASES[case]["causal"]
    with torch.no_grad():
        fused, none_w = attn(x, mask, need_weights=False, is_causal=causal)
        explicit, weights = attn(x, mask, need_weights=True, is_causal=causal)
        hand, _ = _hand_attention(attn, x, mask, causal)
    assert none_w is None
    assert tuple(fused.shape) == tuple(explicit.shape) == (BATCH, TOKENS, WIDTH)
    assert tuple(weights.shape) == (BATCH, TOKENS, TOKENS)
    assert helpers.max_abs_diff(fused, explicit) <= ATOL
    assert helpers.max_abs_diff(explicit, hand) <= HAND_ATOL


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_returned_weights_are_the_unmasked_softmax_averaged_over_heads(case):
    attn, x = _attention(), _tokens()
    mask, causal = MASK_CASES[case]["mask"], MASK_CASES[case]["causal"]
    with torch.no_grad():
        _, weights = attn(x, mask, need_weights=True, is_causal=causal)
        _, plain = attn(x, None, need_weights=True)
        _, hand = _hand_attention(attn, x)
    assert helpers.max_abs_diff(weights, hand) <= WEIGHTS_ATOL
    assert torch.equal(weights, plain)  # the mask never reaches the returned map
    assert helpers.max_abs_diff(weights.sum(dim=-1), torch.ones(BATCH, TOKENS)) <= WEIGHTS_ATOL


def test_parts_equal_the_explicit_forward():
    """attention_parts keeps the intermediates of exactly the unmasked explicit forward."""
    attn, x = _attention(), _tokens()
    with torch.no_grad():
        out, weights = attn(x, None, need_weights=True)
        parts = attention_parts(attn, x)
        one = attention_parts(attn, x[:1], CPU_ATTENTION)
        first, first_weights = attn(x, None, need_weights=True, schedule=CPU_ATTENTION)
    # The same steps (one image, one head at a time) on the same numbers: the same bits.
    assert torch.equal(one.out, first[:1]) and torch.equal(one.weights, first_weights[:1])
    assert helpers.max_abs_diff(parts.out, out) <= ATOL and helpers.max_abs_diff(parts.weights, weights) <= WEIGHTS_ATOL
    assert parts.probs.shape == (BATCH, HEADS, TOKENS, TOKENS)
    scale = (WIDTH // HEADS) ** -0.5
    assert helpers.max_abs_diff(parts.probs, torch.softmax(parts.q @ parts.k.transpose(-2, -1), -1)) <= WEIGHTS_ATOL
    assert helpers.max_abs_diff(parts.heads, parts.probs @ parts.v) <= WEIGHTS_ATOL
    q = x @ attn.in_proj_weight[:WIDTH].t() + attn.in_proj_bias[:WIDTH]
    assert helpers.max_abs_diff(parts.q, scale * q.reshape(BATCH, TOKENS, HEADS, -1).transpose(1, 2)) <= ATOL


SCHEDULES = {
    "cpu": CPU_ATTENTION,
    "one_image": AttentionSchedule(images=1),
    "one_head": AttentionSchedule(heads=1),
    "uneven": AttentionSchedule(images=2, heads=3),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_attention_schedule_gives_the_all_at_once_results(name, case):
    """The GPU schedule (everything at once) and the CPU one (one image, one head) on a CPU:
    maps within 1e-6 and outputs within 1e-6 of their magnitude at this tiny size, where BLAS
    may round batched products apart."""
    attn, x = _attention(), _tokens()
    mask, causal = MASK_CASES[case]["mask"], MASK_CASES[case]["causal"]
    first_mask = mask[..., :1, :] if mask is not None else None  # as Transformer cuts it for n_queries
    with torch.no_grad():
        out, weights = attn(x, mask, need_weights=True, is_causal=causal, schedule=ALL_AT_ONCE)
        got, got_weights = attn(x, mask, need_weights=True, is_causal=causal, schedule=SCHEDULES[name])
        first, first_weights = attn(x, first_mask, need_weights=True, is_causal=causal, n_queries=1,
                                    schedule=SCHEDULES[name])
    scale = float(out.abs().max())
    assert helpers.max_abs_diff(got, out) <= WEIGHTS_ATOL * scale
    assert helpers.max_abs_diff(got_weights, weights) <= WEIGHTS_ATOL
    assert helpers.max_abs_diff(first, out[:, :1]) <= WEIGHTS_ATOL * scale
    assert helpers.max_abs_diff(first_weights, weights[:, :1]) <= WEIGHTS_ATOL


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_attention_schedules_are_bit_equal_at_clip_sizes(name):
    """At CLIP's token counts (197 = a 224×224 image at patch 16) the schedules give the same bits."""
    attn, x = _attention(width=128, heads=4), _tokens(n=197)
    mask = (1 - torch.eye(197)) * -100.0  # the self-only block of TagCLIP's main pass
    with torch.no_grad():
        for m in (None, mask):
            out, weights = attn(x, m, need_weights=True, schedule=ALL_AT_ONCE)
            got, got_weights = attn(x, m, need_weights=True, schedule=SCHEDULES[name])
            assert torch.equal(got, out) and torch.equal(got_weights, weights)
            if m is None:  # parts() is the unmasked pass
                parts = attention_parts(attn, x[:1], SCHEDULES[name])
                assert torch.equal(parts.out, out[:1]) and torch.equal(parts.weights, weights[:1])


def _block(seed: int = 3) -> ResidualAttentionBlock:
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(WIDTH, HEADS)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, WIDTH ** -0.5)
    return block.eval().requires_grad_(False)


@pytest.mark.parametrize("need_weights", [False, True])
def test_block_output_does_not_depend_on_autograd_state(need_weights):
    """One block on the same numbers: the same bits under no_grad, inference mode, grad mode,
    and with an input that requires grad (the kernel choice never reads autograd state)."""
    block, x = _block(), _tokens(n=50)
    with torch.no_grad():
        ref, ref_w = block(x, need_weights=need_weights)
    with torch.inference_mode():
        inf, inf_w = block(x.clone(), need_weights=need_weights)
    with torch.enable_grad():
        plain, plain_w = block(x, need_weights=need_weights)
        leaf = x.clone().requires_grad_(True)
        tracked, tracked_w = block(leaf, need_weights=need_weights)
        assert tracked.requires_grad
    for got, got_w in ((inf, inf_w), (plain, plain_w), (tracked.detach(), tracked_w)):
        assert torch.equal(got, ref)
        if need_weights:
            assert torch.equal(got_w.detach(), ref_w)


def test_linear_gradients_equal_the_plain_linear_gradients():
    """The oneDNN product's backward pass (input, weight and bias gradients) against F.linear's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, WIDTH, generator=g)
    weight, bias = torch.randn(3 * WIDTH, WIDTH, generator=g) * 0.1, torch.randn(3 * WIDTH, generator=g)
    cot = torch.randn(2, 9, 3 * WIDTH, generator=g)
    grads = []
    for fn in (model_linear, torch.nn.functional.linear):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
        fn(*leaves).backward(cot)
        grads.append([t.grad for t in leaves])
    for ours, plain in zip(*grads):
        assert helpers.max_abs_diff(ours, plain) <= ATOL


def test_weight_packing_is_probed_and_falls_back(monkeypatch):
    """Weights are packed only where the probe found the packed product bit-equal to the plain
    one; where the reorder operator fails, products run on the plain weight with the same bits."""
    layer, x = Linear(WIDTH, WIDTH).eval(), _tokens(n=5)
    with torch.no_grad():
        plain = model_linear(x, layer.weight, layer.bias)
        assert torch.equal(layer(x), plain)
        assert ("weight" in layer.weight_cache) == packing_supported()

        def broken(*args):
            raise RuntimeError("reorder not supported on this CPU")

        monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", broken)
        packing_supported.cache_clear()
        try:
            assert not packing_supported()
            fresh = Linear(WIDTH, WIDTH).eval()
            fresh.load_state_dict(layer.state_dict())
            assert torch.equal(fresh(x), plain) and "weight" not in fresh.weight_cache
        finally:
            monkeypatch.undo()
            packing_supported.cache_clear()


def test_masks_change_the_output_but_not_the_returned_map():
    torch.manual_seed(3)
    block = ResidualAttentionBlock(WIDTH, HEADS).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    x = _tokens(seed=4)
    with torch.no_grad():
        plain, w_plain = block(x, None, need_weights=True)
        masked, w_masked = block(x, _off_diagonal(TOKENS), need_weights=True)
        masked_fused, _ = block(x, _off_diagonal(TOKENS), need_weights=False)
    assert helpers.max_abs_diff(plain, masked) > 1e-2
    assert torch.equal(w_plain, w_masked)
    assert helpers.max_abs_diff(masked, masked_fused) <= ATOL
    # -100 off the diagonal: the map itself is far from the identity, so the mask mattered
    assert float(torch.diagonal(w_plain, dim1=-2, dim2=-1).mean()) < 0.9


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("case", ["none", "off_diagonal_-100", "per_sample"])
def test_first_query_only_matches_the_full_computation(case, need_weights):
    attn, x = _attention(), _tokens()
    mask = MASK_CASES[case]["mask"]
    with torch.no_grad():
        full, full_w = attn(x, mask, need_weights=need_weights)
        first, first_w = attn(x, None if mask is None else mask[..., :1, :], need_weights=need_weights,
                              n_queries=1)
    assert tuple(first.shape) == (BATCH, 1, WIDTH)
    assert helpers.max_abs_diff(first, full[:, :1]) <= ATOL
    if need_weights:
        assert tuple(first_w.shape) == (BATCH, 1, TOKENS)
        assert helpers.max_abs_diff(first_w, full_w[:, :1]) <= WEIGHTS_ATOL


# ----------------------------------------------------------------------------- vision tower

@functools.lru_cache(maxsize=None)
def _model(seed: int = 0, vision_width: int = 128):
    return helpers.random_model(seed, vision_width=vision_width)


@pytest.mark.parametrize("hw", [(224, 224), (64, 96), (16, 304)])
@pytest.mark.parametrize("masks", ["none", "self_only", "region"])
def test_cls_only_equals_the_class_token_of_the_full_forward(hw, masks):
    model = _model()
    visual = model.visual
    x = torch.stack([helpers.smooth_random_image(s, *hw) for s in (11, 12)])
    n_tokens = 1 + (hw[0] // 16) * (hw[1] // 16)
    if masks == "none":
        block_masks = None
    elif masks == "self_only":
        block_masks = self_only_masks(visual.transformer.layers, n_tokens, -100.0)
    else:
        g = torch.Generator().manual_seed(2)
        regions = torch.rand(2, n_tokens - 1, generator=g) < 0.5
        block_masks = region_masks(regions, visual.transformer.layers, -1000.0)
    with torch.no_grad():
        full = visual(x, block_masks).tokens
        cls = visual(x, block_masks, cls_only=True).tokens
        full_w = visual(x, block_masks, need_weights=True)
    assert tuple(cls.shape) == (2, 1, full.shape[-1])
    assert tuple(full.shape) == (2, n_tokens, full.shape[-1])
    assert helpers.max_abs_diff(cls, full[:, :1]) <= ATOL
    assert helpers.max_abs_diff(full_w.tokens, full) <= ATOL  # explicit path agrees with fused
    assert len(full_w.attentions) == visual.transformer.layers
    assert all(tuple(a.shape) == (2, n_tokens, n_tokens) for a in full_w.attentions)


def test_region_mask_changes_the_class_token():
    """-1000 on the class-token row really restricts it (the masks reach every block)."""
    visual = _model().visual
    x = helpers.smooth_random_image(13, 224, 224)[None]
    regions = torch.zeros(1, 196, dtype=torch.bool)
    regions[0, :20] = True
    with torch.no_grad():
        free = visual(x, cls_only=True).tokens
        restricted = visual(x, region_masks(regions, visual.transformer.layers, -1000.0), cls_only=True).tokens
    assert helpers.max_abs_diff(free, restricted) > 1e-3


def test_wrong_number_of_masks_is_rejected():
    visual = _model().visual
    x = helpers.smooth_random_image(1, 32, 32)[None]
    with pytest.raises(ValueError, match="expected 12 attention masks"):
        visual(x, [None] * 11)


# ----------------------------------------------------------------------------- text tower

PROMPTS = [
    "a photo of a cat.",
    "there is the diningtable in the scene.",
    "a",
    "a low resolution photo of the person with clothes,people,human.",
    "itap of my tvmonitor screen in a very very very very long sentence with many words to push the "
    "end token far to the right of the context window",
]


def _reference_encode_text(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full 77-token computation: explicit path, explicit additive causal mask, no truncation."""
    n = tokens.shape[1]
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = model.token_embedding(tokens) + model.positional_embedding
    for block in model.transformer.resblocks:
        x, _ = block(x, causal, need_weights=True)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection


@pytest.mark.parametrize("layers", [2, 3])
def test_encode_text_truncation_is_exact(layers):
    model = helpers.random_model(seed=5, vision_layers=12, vision_width=64, text_layers=layers)
    tokens = tokenize(PROMPTS)
    assert tuple(tokens.shape) == (len(PROMPTS), 77)
    lengths = tokens.argmax(dim=-1) + 1
    assert int(lengths.max()) < 77 and int(lengths.min()) < int(lengths.max())
    with torch.no_grad():
        ref = _reference_encode_text(model, tokens)
        got = model.encode_text(tokens)
        singles = torch.cat([model.encode_text(tokens[i:i + 1]) for i in range(len(PROMPTS))])
    assert tuple(got.shape) == (len(PROMPTS), model.text_projection.shape[1])
    assert helpers.max_abs_diff(got, ref) <= ATOL
    assert helpers.max_abs_diff(singles, ref) <= ATOL
    # padding beyond the end token really is ignored: a different filler changes nothing
    filled = tokens.clone()
    for i, n in enumerate(lengths.tolist()):
        filled[i, n:] = 320  # any id smaller than the end token
    with torch.no_grad():
        assert helpers.max_abs_diff(model.encode_text(filled), ref) <= ATOL


def test_reference_text_computation_is_sensitive_to_the_causal_mask():
    """Guard for the check above: without the causal mask the result is different."""
    model = helpers.random_model(seed=5, vision_width=64, text_layers=2)
    tokens = tokenize(PROMPTS[:2])
    with torch.no_grad():
        ref = _reference_encode_text(model, tokens)
        x = model.token_embedding(tokens) + model.positional_embedding
        for block in model.transformer.resblocks:
            x, _ = block(x, None, need_weights=True)
        x = model.ln_final(x)
        no_mask = x[torch.arange(2), tokens.argmax(dim=-1)] @ model.text_projection
    assert helpers.max_abs_diff(no_mask, ref) > 1e-3


# ----------------------------------------------------------------------------- build_model

@pytest.mark.parametrize("vision_width,text_width,text_layers", [(128, 64, 2), (64, 64, 3), (128, 128, 2)])
def test_build_model_reads_the_architecture_from_shapes(vision_width, text_width, text_layers):
    sd = helpers.random_state_dict(seed=1, vision_width=vision_width, text_width=text_width,
                                   text_layers=text_layers, embed_dim=48)
    model = build_model(sd)
    visual = model.visual
    assert visual.conv1.weight.shape[0] == vision_width
    assert visual.patch_size == 16 and visual.input_resolution == 224
    assert visual.transformer.layers == 12 and len(visual.transformer.resblocks) == 12
    assert all(b.attn.heads == vision_width // 64 for b in visual.transformer.resblocks)
    assert model.transformer.layers == text_layers
    assert all(b.attn.heads == text_width // 64 for b in model.transformer.resblocks)
    assert model.context_length == 77
    assert model.token_embedding.weight.shape == (49408, text_width)
    assert model.text_projection.shape == (text_width, 48)
    assert model.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_build_model_ignores_openai_scalar_entries():
    sd = helpers.random_state_dict(seed=1, vision_width=64)
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))
    model = build_model(sd)
    assert model.visual.input_resolution == 224


@pytest.mark.parametrize("key", ["visual.transformer.resblocks.3.mlp.c_fc.bias", "visual.ln_post.bias",
                                 "transformer.resblocks.1.ln_2.weight", "visual.class_embedding"])
def test_build_model_loads_strictly_missing_key(key):
    sd = helpers.random_state_dict(seed=1, vision_width=64)
    del sd[key]
    with pytest.raises(RuntimeError, match="Missing key"):
        build_model(sd)


def test_build_model_loads_strictly_unexpected_key():
    sd = helpers.random_state_dict(seed=1, vision_width=64,
                                   extra_keys={"visual.transformer.resblocks.0.attn.extra": torch.zeros(3)})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        build_model(sd)


def test_load_reports_a_missing_key_as_input_error(tmp_path):
    sd = helpers.random_state_dict(seed=1, vision_width=64)
    del sd["visual.ln_pre.weight"]
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(InputError, match="not a CLIP ViT checkpoint"):
        clip.load_clip(str(path), cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------- checkpoint formats



def _save(kind: str, state: dict, path) -> None:
    if kind == "torch":
        torch.save(state, path)
    elif kind == "npz":
        with open(path, "wb") as f:
            np.savez(f, **{k: v.numpy() for k, v in state.items()})
    else:
        save_torchscript(state, path)


def test_checkpoint_formats_give_identical_models(tmp_path):
    state = helpers.random_state_dict(seed=9, vision_width=64, text_layers=2, dtype=torch.float16)
    x = torch.stack([helpers.smooth_random_image(1, 48, 64), helpers.smooth_random_image(2, 48, 64)])
    text = tokenize(["a photo of a dog.", "there is a sky in the scene."])
    outputs = {}
    for kind in ("torch", "npz", "torchscript"):
        path = tmp_path / f"tiny.{kind}"
        _save(kind, state, path)
        model = clip.load_clip(str(path), cache_dir=tmp_path / "cache")
        assert model.dtype == torch.float32
        for key, value in state.items():
            assert torch.equal(model.state_dict()[key], value.float()), (kind, key)
        n_tokens = 1 + 3 * 4
        with torch.no_grad():
            vis = model.visual(x, self_only_masks(12, n_tokens, -100.0), need_weights=True)
            outputs[kind] = (vis.tokens, torch.stack(vis.attentions), model.encode_text(text))
    ref = outputs["torch"]
    for kind in ("npz", "torchscript"):
        for a, b in zip(outputs[kind], ref):
            assert torch.equal(a, b), kind


def test_tiny_golden_checkpoint_architecture(tiny_model):
    """The golden npz (OpenAI keys, float16) builds the manifest's architecture."""
    visual = tiny_model.visual
    assert visual.conv1.weight.shape[0] == 128 and visual.transformer.layers == 12
    assert visual.transformer.resblocks[0].attn.heads == 2
    assert tiny_model.transformer.layers == 3 and tiny_model.transformer.resblocks[0].attn.heads == 1
    assert tiny_model.text_projection.shape == (64, 96)
    assert abs(float(tiny_model.logit_scale) - math.log(100.0)) < 1e-2


def test_packed_weights_follow_the_weight_and_never_travel():
    """Linear keeps oneDNN's blocked copy of its weight: results are those of the plain call,
    an in-place change of the weight is seen, and copies / dtype moves drop the cache."""
    torch.manual_seed(5)
    layer = Linear(WIDTH, 3 * WIDTH).eval()
    x = torch.randn(7, WIDTH)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(first, model_linear(x, layer.weight, layer.bias))  # no cache: plain call
        assert "weight" in layer.weight_cache
        layer.weight.mul_(2.0)
        second = layer(x)
        assert torch.equal(second, model_linear(x, layer.weight, layer.bias))
        assert helpers.max_abs_diff(second - layer.bias, 2 * (first - layer.bias)) <= ATOL
        grad = torch.randn(7, 3 * WIDTH)
        assert helpers.max_abs_diff(input_gradient(layer, grad), grad @ layer.weight) <= ATOL
    assert "_onednn_weights" not in copy.deepcopy(layer).__dict__
    assert "_onednn_weights" not in pickle.loads(pickle.dumps(layer)).__dict__
    layer.double()
    assert "_onednn_weights" not in layer.__dict__
