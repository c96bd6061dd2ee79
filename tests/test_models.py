"""Model towers, ContrastiveCaptioner features and caption decoding."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from finealign.config import ConfigError, ModelConfig, load_preset
from finealign.models.coca import ContrastiveCaptioner
from finealign.models.factory import build_model, count_parameters
from finealign.types import Batch

BOS, EOS, PAD = 1, 2, 0
VOCAB = 64


def model_cfg(preset: str, **over) -> ModelConfig:
    try:
        from finealign.config import from_dict
        cfg = from_dict({"model": {"preset": preset}}).model
    except (ImportError, KeyError, ConfigError):  # objectives not registered yet: build the preset directly
        cfg = ModelConfig(preset=preset, **load_preset(preset))
    return dataclasses.replace(cfg, **over)


def make_batch(cfg: ModelConfig, B: int = 3, T: int = 12, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    text = torch.randint(3, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([T, T // 2, 3])[:B]
    pos = torch.arange(T)[None]
    text[:, 0] = BOS
    text[pos == (lengths[:, None] - 1)] = EOS
    mask = pos < lengths[:, None]
    text[~mask] = PAD
    return Batch(images=images, text=text, text_mask=mask, image_ids=torch.arange(B), item_ids=torch.arange(B),
                 captions=[""] * B, keys=[str(i) for i in range(B)])


def tiny_model(seed: int = 0, **over) -> ContrastiveCaptioner:
    torch.manual_seed(seed)
    return build_model(model_cfg("tiny", vocab_size=0, **over), VOCAB).eval()


@pytest.mark.parametrize("preset", ["tiny", "bench-tiny"])
def test_forward_shapes(preset):
    torch.manual_seed(0)
    cfg = model_cfg(preset, vocab_size=0)
    model = build_model(cfg, VOCAB)
    batch = make_batch(cfg, B=2)
    f = model(batch)
    B, T = batch.text.shape
    N = (cfg.image_size // cfg.patch_size) ** 2
    assert f.image_embed.shape == f.text_embed.shape == (B, cfg.embed_dim)
    assert f.image_tokens.shape == (B, N, cfg.vision_width)
    assert f.text_tokens.shape == (B, T, cfg.text_width)
    assert f.caption_logits.shape == (B, T, VOCAB)
    assert f.logit_scale.shape == () and abs(f.logit_scale.item() - 1 / cfg.init_temperature) < 1e-3
    for t in (f.image_embed, f.text_embed, f.image_tokens, f.text_tokens, f.caption_logits):
        assert torch.isfinite(t).all()
    assert torch.allclose(f.image_embed.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert torch.allclose(f.text_embed.norm(dim=-1), torch.ones(B), atol=1e-5)
    img = model.encode_image(batch.images)
    assert img["memory"].shape == (B, cfg.caption_queries, cfg.text_width)
    assert img["cls"].shape == (B, cfg.vision_width)


def test_clip_variant_has_no_decoder():
    cfg = model_cfg("tiny", decoder_layers=0, image_pool="cls")
    model = build_model(cfg, VOCAB)
    assert model.decoder is None and model.pooler is None
    f = model(make_batch(cfg))
    assert f.caption_logits is None and f.image_embed.shape == (3, cfg.embed_dim)
    assert model.encode_image(make_batch(cfg).images)["memory"] is None
    with pytest.raises(RuntimeError, match="needs a caption decoder"):
        model.generate(make_batch(cfg).images, BOS, EOS, PAD)
    # cls pooling with a decoder: a separate memory pooler
    m2 = build_model(model_cfg("tiny", image_pool="cls"), VOCAB)
    assert m2(make_batch(cfg)).caption_logits.shape == (3, 12, VOCAB)


def test_factory_validates_and_counts():
    with pytest.raises(ConfigError, match="text_width"):
        build_model(model_cfg("tiny", text_heads=3), VOCAB)
    m = build_model(model_cfg("tiny", vocab_size=100), VOCAB)
    assert m.decoder.lm_head.out_features == 100
    assert count_parameters(m) == sum(p.numel() for p in m.parameters())


def test_text_pooled_independent_of_padding():
    model = tiny_model()
    cfg = model.cfg
    b16 = make_batch(cfg, T=16)
    T = 32
    text = torch.full((3, T), PAD)
    text[:, :16] = b16.text
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[:, :16] = b16.text_mask
    e16, e32 = model.encode_text(b16.text, b16.text_mask), model.encode_text(text, mask)
    assert torch.allclose(e16["embed"], e32["embed"], atol=1e-5)
    assert torch.allclose(e16["tokens"][b16.text_mask], e32["tokens"][:, :16][b16.text_mask], atol=1e-5)


def test_forward_step_matches_full_forward():
    model = tiny_model()
    text = make_batch(model.cfg, T=10).text.clone()
    text[text == PAD] = 5
    full = model.text(text, torch.ones_like(text, dtype=torch.bool))[1]
    assert torch.allclose(model.text.encode_tokens(text), full, atol=1e-5)
    cache = model.text.new_cache()
    parts = [model.text.forward_step(text[:, :4], cache, 0)]          # a chunk, then one at a time
    parts += [model.text.forward_step(text[:, i:i + 1], cache, i) for i in range(4, 7)]
    parts.append(model.text.forward_step(text[:, 7:], cache, 7))       # chunk after a prefix
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    memory = model.encode_image(make_batch(model.cfg).images)["memory"]
    logits = model.caption_logits(memory, full)
    dcache = model.decoder.new_cache()
    steps = [model.decoder.forward_step(full[:, :3], memory, dcache, 0)]
    steps += [model.decoder.forward_step(full[:, i:i + 1], memory, dcache, i) for i in range(3, 10)]
    assert torch.allclose(torch.cat(steps, 1), logits, atol=1e-4)


@pytest.fixture(scope="module")
def trained():
    """A tiny captioner fitted for a few steps to caption 4 images with captions of different lengths,
    so that decoding is neither degenerate nor a single repeated token."""
    model = tiny_model(seed=0, text_layers=1, decoder_layers=1, vision_layers=1)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size, generator=g)
    caps = [[BOS, 5, 6, 7, EOS], [BOS, 8, 9, EOS], [BOS, 10, 11, 12, 13, 14, EOS], [BOS, 15, EOS]]
    T = max(map(len, caps))
    text = torch.tensor([c + [PAD] * (T - len(c)) for c in caps])
    mask = text != PAD
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        f = model(Batch(images, text, mask, torch.arange(4), torch.arange(4), [""] * 4, [""] * 4))
        loss = F.cross_entropy(f.caption_logits[:, :-1].flatten(0, 1), text[:, 1:].flatten(),
                               ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), images, text


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_cached_generation_equals_uncached(trained, strategy):
    model, images, _ = trained
    images = torch.cat([images, images.flip(-1)])                     # 4 fitted + 4 unseen images
    kw = dict(strategy=strategy, max_new_tokens=10, beam_size=3)
    cached = model.generate(images, BOS, EOS, PAD, use_cache=True, **kw)
    uncached = model.generate(images, BOS, EOS, PAD, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert (cached[:, 0] == BOS).all() and len(set(map(tuple, cached.tolist()))) > 1
    for row in cached.tolist():                                       # PAD only after EOS
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])
        assert PAD not in row[: row.index(EOS) if EOS in row else len(row)]
    assert (cached == EOS).any(dim=1).sum() >= 4


def test_generation_fits_training_captions(trained):
    model, images, text = trained
    out = model.generate(images, BOS, EOS, PAD, strategy="beam", max_new_tokens=10)
    assert out.shape[0] == 4
    for row, ref in zip(out.tolist(), text.tolist()):
        ref = [t for t in ref if t != PAD]
        assert row[:len(ref)] == ref


@pytest.fixture(scope="module")
def random_captioner():
    """Random-init tiny captioner with a sharpened LM head: beams diverge from greedy, and with EOS = a
    token it emits late, some rows finish early while others run to max_new_tokens."""
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(10.0)
    images = make_batch(model.cfg, B=3).images
    return model, torch.cat([images, -images, 2 * images])


def test_cached_beam_equals_uncached_with_reordering(random_captioner):
    model, images = random_captioner
    eos = 30
    out = {}
    for strategy in ("greedy", "beam"):
        for use_cache in (True, False):
            out[strategy, use_cache] = model.generate(images, BOS, eos, PAD, strategy=strategy, beam_size=4,
                                                      max_new_tokens=12, use_cache=use_cache)
        assert torch.equal(out[strategy, True], out[strategy, False]), strategy
    beam = out["beam", True]
    assert not torch.equal(beam, out["greedy", True][:, :beam.shape[1]])
    ended = (beam == eos).any(dim=1)
    assert ended.any() and not ended.all()


def test_top_p_reproducible(random_captioner):
    model, images = random_captioner
    kw = dict(strategy="top_p", top_p=0.9, temperature=1.0, max_new_tokens=8)
    a = model.generate(images, BOS, EOS, PAD, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(images, BOS, EOS, PAD, generator=torch.Generator().manual_seed(3), **kw)
    c = model.generate(images, BOS, EOS, PAD, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(a, b) and (a[:, 0] == BOS).all()
    assert not torch.equal(a, c)
    # top_p -> 0 keeps only the most likely token: greedy
    g = model.generate(images, BOS, EOS, PAD, max_new_tokens=8)
    assert torch.equal(model.generate(images, BOS, EOS, PAD, strategy="top_p", top_p=1e-6, max_new_tokens=8,
                                      generator=torch.Generator().manual_seed(0)), g)


def test_grad_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_model(seed=0, grad_checkpointing=ckpt).train()
        f = model(make_batch(model.cfg))
        logits = f.logit_scale * f.image_embed @ f.text_embed.T
        labels = torch.arange(logits.shape[0])
        b = make_batch(model.cfg)
        loss = F.cross_entropy(logits, labels) + F.cross_entropy(
            f.caption_logits[:, :-1].flatten(0, 1), b.text[:, 1:].flatten(), ignore_index=PAD)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4), n


def test_cls_attention_sums_to_one():
    model = tiny_model()
    images = make_batch(model.cfg).images
    out = model.encode_image(images, return_attn=True)
    N = model.visual.num_patches
    attn = out["attn"]
    assert attn.shape == (3, N) and (attn >= 0).all()
    assert torch.allclose(attn.sum(-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out["patches"], model.encode_image(images)["patches"], atol=1e-5)
    assert torch.allclose(model.visual.cls_attention(images), attn)


def test_open_clip_decoder_layout_adds_one_mlp_per_layer_and_keeps_cache_exact():
    fused = tiny_model(seed=0, decoder_layers=2)
    oc = tiny_model(seed=0, decoder_layers=2, decoder_block="open_clip")
    D, r = fused.cfg.text_width, fused.cfg.mlp_ratio
    extra = 2 * (2 * D + (D * int(r * D) + int(r * D)) + (int(r * D) * D + D))   # ln_s + mlp_s per layer
    assert count_parameters(oc) - count_parameters(fused) == extra
    oc.eval()
    images = make_batch(oc.cfg).images
    kw = dict(strategy="greedy", max_new_tokens=6)
    assert torch.equal(oc.generate(images, BOS, EOS, PAD, use_cache=True, **kw),
                       oc.generate(images, BOS, EOS, PAD, use_cache=False, **kw))


class ScriptedCaptioner:
    """Stand-in for a captioner in ``generate(..., use_cache=False)``: no weights, the next-token logits
    (N, V) are ``next_logits(prefixes)`` of the rows decoded so far (N, L). Decoding rules can then be
    checked against hand-computed log-probabilities."""

    def __init__(self, next_logits, context_length: int = 16):
        self.next_logits = next_logits
        self.decoder = self._decode                                   # generate() only needs it callable
        self.text = type("Text", (), {"context_length": context_length,
                                      "encode_tokens": staticmethod(lambda seqs: seqs)})()

    def encode_image(self, images):
        return {"memory": torch.zeros(images.shape[0], 1, 1)}

    def _decode(self, seqs, memory):
        logits = self.next_logits(seqs)                               # (N, V)
        return logits[:, None].expand(-1, seqs.shape[1], -1)          # only the last position is read


def test_top_p_temperature_scales_logits_before_sampling():
    """top_p sampling draws from softmax(logits / temperature): with top_p=1 (no truncation) and ids
    ordered by decreasing logit (so the nucleus sort is the identity; BOS / PAD, banned, sit last), every
    draw equals torch.multinomial(softmax(logits / T)) under the same seed, and the draw frequencies follow
    softmax(logits / T), not softmax(logits). On a real captioner, T -> 0 is greedy decoding."""
    from finealign.models.generation import generate
    eos, pad, bos = 0, 4, 5                                           # V = 6: tokens 0..3, then PAD, BOS
    base = torch.tensor([1.0, 0.4, -0.3, -1.2])                       # decreasing: sort keeps the order
    row = torch.cat([base, torch.tensor([0.0, 0.0])])                 # PAD / BOS get banned (-inf)
    n = 3000
    lm = ScriptedCaptioner(lambda seqs: row.expand(seqs.shape[0], -1).clone())
    images = torch.zeros(n, 3, 2, 2)
    for T in (0.5, 2.0):
        out = generate(lm, images, bos, eos, pad, strategy="top_p", top_p=1.0, temperature=T,
                       max_new_tokens=1, use_cache=False, generator=torch.Generator().manual_seed(7))
        probs = torch.softmax(torch.cat([base / T, torch.full((2,), float("-inf"))]), dim=-1)
        want = torch.multinomial(probs.expand(n, -1), 1, generator=torch.Generator().manual_seed(7))[:, 0]
        assert torch.equal(out[:, 1], want), T
        freq = torch.bincount(out[:, 1], minlength=6).float() / n
        assert torch.allclose(freq, probs, atol=0.03), (T, freq, probs)
        untempered = torch.softmax(base, dim=-1)
        assert (freq[:4] - untempered).abs().max() > 0.08           # T visibly changes the distribution
    # T = 1e-4 on the real model: the nucleus is the argmax token at every step, i.e. greedy; T = 1 differs
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(3.0)
    imgs = make_batch(model.cfg, B=3).images
    greedy = model.generate(imgs, BOS, EOS, PAD, max_new_tokens=8)
    kw = dict(strategy="top_p", top_p=1.0, max_new_tokens=8)
    cold = model.generate(imgs, BOS, EOS, PAD, temperature=1e-4, generator=torch.Generator().manual_seed(0), **kw)
    warm = model.generate(imgs, BOS, EOS, PAD, temperature=1.0, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(cold, greedy)
    assert not torch.equal(warm, greedy)


def test_beam_search_ranks_candidates_by_length_normalised_log_prob():
    """Beam search keeps the K candidates with the highest sum(log p) / #generated tokens, not the
    highest raw sum. Hand-built LM (tokens PAD 0, BOS 1, EOS 2, A 3, B 4, C 5), K = 2:
    step 1: A (log .6 = -0.511) and EOS (log .35 = -1.050, finished);
    step 2: [A B] = -1.204 (norm -0.602) and [A C] = -1.310 (norm -0.655) both beat the finished [EOS]
    (-1.050 / 1) once normalised; the raw sum would keep [EOS] and drop [A C];
    step 3: [A C EOS] = -1.361 (norm -0.454) beats [A B EOS] = -2.120 (norm -0.707).
    The answer is BOS A C EOS; ranking by raw sums would have given BOS A B EOS (the best of [EOS] and
    [A B EOS] by the normalised final pick)."""
    from finealign.models.generation import generate
    pad, bos, eos, A, B, C = 0, 1, 2, 3, 4, 5
    table = {(bos,): [.35, .6, .03, .02],                             # P(EOS, A, B, C | prefix)
             (bos, A): [.04, .01, .5, .45],
             (bos, A, B): [.4, .3, .2, .1],
             (bos, A, C): [.95, .02, .02, .01]}

    def next_logits(seqs):
        out = torch.full((seqs.shape[0], 6), float("-inf"))
        for r, s in enumerate(seqs.tolist()):
            out[r, 2:] = torch.tensor(table.get(tuple(s), [.25] * 4)).log()
        return out

    lm = ScriptedCaptioner(next_logits)
    out = generate(lm, torch.zeros(2, 3, 2, 2), bos, eos, pad, strategy="beam", beam_size=2,
                   max_new_tokens=5, use_cache=False)
    assert out.tolist() == [[bos, A, C, eos]] * 2
    # the hand numbers above: the raw sum ranks [EOS] above [A C], the normalised score the other way
    lp = {k: torch.tensor(v).log().tolist() for k, v in table.items()}
    ac, ab = lp[bos,][1] + lp[bos, A][3], lp[bos,][1] + lp[bos, A][2]
    assert lp[bos,][0] > ab > ac and ac / 2 > lp[bos,][0]
    assert (ac + lp[bos, A, C][0]) / 3 > (ab + lp[bos, A, B][0]) / 3 > lp[bos,][0]


def test_generation_never_emits_bos_or_pad_but_allows_eos():
    """Live rows may not emit BOS or PAD, however much the LM head prefers them (output bias +100 / +90):
    greedy, beam and top_p then emit other tokens, and PAD appears only after EOS. EOS stays allowed
    (bias +80: every caption is BOS EOS), also when PAD doubles as EOS (then PAD ends the caption)."""
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.decoder.lm_head.bias[PAD] += 100.0
        model.decoder.lm_head.bias[BOS] += 90.0
    images = make_batch(model.cfg, B=3).images
    kw = dict(max_new_tokens=6, beam_size=3, top_p=0.9)

    def run(eos):
        return {s: model.generate(images, BOS, eos, PAD, strategy=s, generator=torch.Generator().manual_seed(0),
                                  **kw) for s in ("greedy", "beam", "top_p")}

    for strategy, out in run(EOS).items():
        assert (out[:, 0] == BOS).all(), strategy
        for row in out.tolist():
            end = row.index(EOS) if EOS in row else len(row)
            assert end > 1 and BOS not in row[1:end] and PAD not in row[1:end], (strategy, row)
            assert all(t == PAD for t in row[end + 1:]), (strategy, row)
    with torch.no_grad():
        model.decoder.lm_head.bias[EOS] += 80.0
    for strategy, out in run(EOS).items():
        assert (out[:, :2] == torch.tensor([BOS, EOS])).all() and (out[:, 2:] == PAD).all(), strategy
    for strategy, out in run(PAD).items():                            # eos_id == pad_id: PAD may end
        assert (out[:, :2] == torch.tensor([BOS, PAD])).all() and (out[:, 2:] == PAD).all(), strategy


def test_logit_scale_is_clamped_at_100():
    """exp(logit_scale) is capped at 100 (CLIP's clamp), for the dual encoder and the fusion model."""
    import math
    from finealign.config import load_config
    for recipe in ("coca", "albef"):
        model = build_model(load_config(recipe, ["model.preset=tiny"]).model, 64)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1000.0))
        assert model.get_logit_scale().item() == pytest.approx(100.0), recipe
        with torch.no_grad():
            model.logit_scale.fill_(math.log(20.0))
        assert model.get_logit_scale().item() == pytest.approx(20.0), recipe
