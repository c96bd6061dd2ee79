"""The optimised inference paths give exactly what the plain ones give: the preallocated KV cache and
grouped cross-attention of cached beam search, and the one-product retrieval ranks (against the
bool-mask reference, with many exact ties)."""
import pytest
import torch
import torch.nn.functional as F

from finealign.eval import retrieval
from finealign.eval.retrieval import label_ranks, retrieval_labels, retrieval_metrics, retrieval_ranks
from finealign.models.layers import Attention, KVCache, reorder_caches

# ---------------------------------------------------------------- KV cache


def _kv(g, B=3, H=2, t=1, Dh=4):
    return torch.randn(B, H, t, Dh, generator=g), torch.randn(B, H, t, Dh, generator=g)


def test_kv_cache_append_and_reorder_match_cat_and_index_select():
    g = torch.Generator().manual_seed(0)
    cache, ref_k, ref_v = KVCache(capacity=4), None, None
    for step, t in enumerate([3, 1, 1, 2, 1, 1]):                       # grows past its capacity of 4
        k, v = _kv(g, t=t)
        ref_k = k if ref_k is None else torch.cat([ref_k, k], dim=2)
        ref_v = v if ref_v is None else torch.cat([ref_v, v], dim=2)
        out_k, out_v = cache.append(k, v)
        assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v) and len(cache) == ref_k.shape[2]
        rows = torch.tensor([[2, 2, 0], [1, 0, 2], [0, 1, 2]][step % 3])
        reorder_caches([cache], rows)
        ref_k, ref_v = ref_k[rows], ref_v[rows]
        assert torch.equal(cache.k, ref_k) and torch.equal(cache.v, ref_v)
    cache.reorder(torch.tensor([1, 1, 0, 2, 0]))                      # the batch may change size
    ref_k, ref_v = ref_k[[1, 1, 0, 2, 0]], ref_v[[1, 1, 0, 2, 0]]
    assert torch.equal(cache.k, ref_k) and torch.equal(cache.v, ref_v)
    k, v = _kv(g, B=5)
    assert torch.equal(cache.append(k, v)[0], torch.cat([ref_k, k], dim=2))


def test_grouped_cross_attention_equals_repeated_memory():
    torch.manual_seed(0)
    att = Attention(16, 4, kv_dim=12, cross=True).eval()
    memory = torch.randn(3, 5, 12)                                    # 3 images
    x = torch.randn(3 * 4, 2, 16)                                     # 4 beams per image
    ref = att(x, context=memory.repeat_interleave(4, dim=0))
    cache = KVCache()
    out = att(x, context=memory, cache=cache)                         # keys/values of 3 rows only
    assert cache.k.shape[0] == 3
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(att(x, cache=cache), ref, atol=1e-6)        # from the cache
    with torch.no_grad():
        y, w = att(x, cache=cache, need_weights=True)                 # explicit path expands the keys
    assert torch.allclose(y, ref, atol=1e-6) and w.shape == (12, 4, 2, 5)


def test_low_precision_attention_is_opt_in_applied_everywhere_and_leaves_torch_flags_alone():
    from finealign.config import load_config
    from finealign.models.factory import build_model
    torch.manual_seed(0)
    att = Attention(64, 4)
    x = torch.randn(8, 33, 64)
    with torch.no_grad():
        ref = att(x)                                                   # fp32
        xb, attb = x.bfloat16(), Attention(64, 4).bfloat16()
        attb.load_state_dict({k: v.bfloat16() for k, v in att.state_dict().items()})
        exact = attb(xb)                                               # bf16, scores/softmax upcast to fp32
        attb.low_precision = True
        low = attb(xb)                                                 # bf16 scores and softmax
    assert not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()   # no global switch involved
    assert not torch.equal(low, exact)                                 # the switch changes the math
    err_exact, err_low = (exact.float() - ref).abs().max(), (low.float() - ref).abs().max()
    assert err_low < 0.05 and err_exact < 0.05                         # both within bf16 rounding of fp32
    on = build_model(load_config("albef", ["model.attn_low_precision=true"]).model, 64)
    flags = [m.low_precision for m in on.modules() if isinstance(m, Attention)]
    assert flags and all(flags) and on.teacher is not None             # every tower, the EMA teacher too
    off = build_model(load_config("albef").model, 64)
    assert not any(m.low_precision for m in off.modules() if isinstance(m, Attention))


def test_generation_runs_exactly_max_new_tokens_when_eos_never_comes():
    from finealign.config import load_config
    from finealign.models.factory import build_model
    cfg = load_config("coca", ["model.preset=tiny", "model.context_length=9"]).model
    torch.manual_seed(0)
    model = build_model(cfg, 50).eval()
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(10.0)                       # beams diverge
    images = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    for strategy in ("greedy", "beam"):
        a = model.generate(images, 1, 50, 0, strategy=strategy, beam_size=4, max_new_tokens=8, use_cache=True)
        b = model.generate(images, 1, 50, 0, strategy=strategy, beam_size=4, max_new_tokens=8, use_cache=False)
        assert a.shape == (2, 9) and torch.equal(a, b), strategy


# ---------------------------------------------------------------- retrieval ranks


def _reference_label_ranks(queries, keys, query_label, key_label, chunk):
    """The bool-mask algorithm the optimised code replaced (kept here as the specification)."""
    ranks = torch.empty(queries.shape[0], dtype=torch.long)
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start:start + chunk] @ keys.T
        correct = key_label[None, :] == query_label[start:start + chunk, None]
        best = sims.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
        sims.masked_fill_(correct, float("-inf"))
        ranks[start:start + chunk] = (sims >= best).sum(dim=1)
    return ranks


def _reference_ranks(img, txt, t2i, chunk=1024, image_groups=None):
    g_img, g_txt = retrieval_labels(t2i, img.shape[0], image_groups)
    return (_reference_label_ranks(img, txt, g_img, g_txt, chunk),
            _reference_label_ranks(txt, img, g_txt, g_img, chunk))


def _tied_data(g, I, T, E=8):
    """Entries in multiples of 1/4: every dot product is exact (any summation order) and ties abound;
    some captions and images are exact duplicates."""
    img = torch.randint(-3, 4, (I, E), generator=g).float() / 4
    txt = torch.randint(-3, 4, (T, E), generator=g).float() / 4
    img[1::5] = img[0::5][: img[1::5].shape[0]]
    txt[2::7] = txt[0::7][: txt[2::7].shape[0]]
    t2i = torch.cat([torch.arange(I), torch.randint(0, I, (T - I,), generator=g)])
    return img, txt, t2i[torch.randperm(T, generator=g)]


@pytest.mark.parametrize("seed", range(6))
def test_retrieval_ranks_equal_reference_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    I = int(torch.randint(2, 40, (1,), generator=g))
    img, txt, t2i = _tied_data(g, I, I + int(torch.randint(0, 120, (1,), generator=g)))
    groups = torch.randint(0, max(1, I // 3), (I,), generator=g) if seed % 2 else None
    ties = (img @ txt.T).flatten()
    assert ties.unique().numel() < ties.numel() // 4                  # plenty of exact ties
    for chunk in (1, 5, 1024):
        got = retrieval_ranks(img, txt, t2i, chunk=chunk, image_groups=groups)
        ref = _reference_ranks(img, txt, t2i, chunk, groups)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), chunk
    assert retrieval_metrics(img, txt, t2i, image_groups=groups) == retrieval.recall_metrics(*ref)


def test_retrieval_ranks_equal_reference_on_random_floats():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(300, 32, generator=g), dim=-1)
    txt = F.normalize(torch.randn(1500, 32, generator=g), dim=-1)
    t2i = torch.arange(1500) // 5
    for chunk in (64, 1024):
        got, ref = retrieval_ranks(img, txt, t2i, chunk=chunk), _reference_ranks(img, txt, t2i, chunk)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_retrieval_fallbacks_equal_reference(monkeypatch):
    g = torch.Generator().manual_seed(1)
    img, txt, t2i = _tied_data(g, 12, 40)
    groups = torch.tensor([0] * 10 + [1, 2])                          # one big item: masked fallback
    monkeypatch.setattr(retrieval, "_MAX_PAIRS_PER_ROW", 2)
    got, ref = retrieval_ranks(img, txt, t2i, chunk=5, image_groups=groups), _reference_ranks(img, txt, t2i, 5, groups)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    monkeypatch.undo()
    txt[3, 0] = float("nan")                                          # pre-pass check fails: direct t2i
    got, ref = retrieval_ranks(img, txt, t2i, chunk=5), _reference_ranks(img, txt, t2i, 5)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_label_ranks_queries_without_correct_keys():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randint(-2, 3, (7, 4), generator=g).float(), torch.randint(-2, 3, (9, 4), generator=g).float()
    ql, kl = torch.tensor([0, 1, 5, 1, 9, 0, 2]), torch.tensor([0, 0, 1, 2, 2, 2, 1, 0, 3])
    assert torch.equal(label_ranks(q, k, ql, kl, chunk=3), _reference_label_ranks(q, k, ql, kl, 3))
