"""MacCap parts: noise, the prefix-LM targets, subregions, re-ranking, the HF LM path, training wiring."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finealign.config import ConfigError, load_config
from finealign.objectives.prefix_lm import prefix_lm_targets
from finealign.zeroshot.features import aggregate, inject_noise, rerank, subregion_features


def test_noise_has_the_configured_variance_and_independent_copies():
    g = torch.Generator().manual_seed(0)
    e = F.normalize(torch.randn(500, 64, generator=g), dim=-1)
    x = inject_noise(e, 0.016, 4, torch.Generator().manual_seed(1), normalize=False)     # (500, 4, 64)
    d = x - e[:, None]
    assert d.mean().abs() < 0.002
    assert d.var().item() == pytest.approx(0.016, rel=0.03)          # 128k draws: sd of the estimate ~0.4%
    c = torch.corrcoef(torch.stack([d[:, 0].flatten(), d[:, 1].flatten()]))[0, 1]
    assert abs(c) < 0.02                                              # copies draw their own noise
    y = inject_noise(e, 0.016, 4, torch.Generator().manual_seed(1))
    assert torch.allclose(y.norm(dim=-1), torch.ones(500, 4), atol=1e-5)
    assert torch.allclose(y, F.normalize(x, dim=-1))                  # same seed, same draws
    assert torch.allclose(inject_noise(e, 0.0, 3), e[:, None].expand(-1, 3, -1), atol=1e-6)


def test_prefix_positions_bos_and_pads_are_not_targets():
    ids = torch.tensor([[1, 7, 8, 2, 0], [1, 9, 2, 0, 0]])
    mask = ids != 0
    mask[:, 0] = True
    labels = prefix_lm_targets(ids, mask, prefix_len=3, start=1)      # (2, 8)
    assert labels.tolist() == [[-100, -100, -100, 7, 8, 2, -100, -100],
                               [-100, -100, -100, 9, 2, -100, -100, -100]]
    # start = 0 (GPT-2 style): the last prefix position predicts the first caption token
    assert prefix_lm_targets(ids[:1, 1:], mask[:1, 1:], 3, 0)[0, 2].item() == 7
    from finealign.objectives.prefix_lm import PrefixLM
    from finealign.objectives import StepContext
    from finealign.types import Features
    logits = torch.randn(2, 8, 12)
    feats = Features(caption_logits=logits, extras={"lm_ids": ids, "lm_mask": mask, "prefix_len": torch.tensor(3),
                                                    "lm_start": torch.tensor(1)})
    a = PrefixLM()(feats, None, StepContext())["loss"]
    logits2 = logits.clone()
    logits2[:, :2] = torch.randn(2, 2, 12) * 10                      # prefix outputs do not matter
    b = PrefixLM()(feats.replace(caption_logits=logits2), None, StepContext())["loss"]
    assert a.item() == pytest.approx(b.item())
    ok = labels != -100
    ref = F.cross_entropy(logits[ok], labels[ok])
    assert a.item() == pytest.approx(ref.item(), rel=1e-6)


def test_subregions_on_a_hand_built_attention_map():
    N = 4
    attn = torch.zeros(1, 1 + N, 1 + N)
    attn[0, 0, 1:] = torch.tensor([0.1, 0.5, 0.3, 0.1])              # cls -> patches: top-2 = patches 1, 2
    attn[0, 2, 1:] = torch.tensor([0.0, 0.5, 0.5, 0.0])              # patch 1 attends to patches 1 and 2
    attn[0, 3, 1:] = torch.tensor([0.0, 0.0, 0.0, 2.0])              # patch 2 attends to patch 3 (renormalised)
    dense = torch.eye(N)[None]                                        # patch j's embedding = e_j
    feats, top = subregion_features(dense, attn, k=2)
    assert top.tolist() == [[1, 2]]
    assert torch.allclose(feats[0, 0], F.normalize(torch.tensor([0.0, 1.0, 1.0, 0.0]), dim=0))
    assert torch.allclose(feats[0, 1], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    g = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    agg = aggregate(g, feats, weight=1.0)
    assert torch.allclose(agg[0, 1], F.normalize(torch.tensor([1.0, 0.0, 0.0, 1.0]), dim=0))


def test_subregions_follow_a_given_global_attention():
    N = 4
    attn = torch.softmax(torch.randn(1, 1 + N, 1 + N, generator=torch.Generator().manual_seed(0)), -1)
    attn[0, 0, 1:] = torch.tensor([0.1, 0.5, 0.3, 0.1])              # the cls row would pick patches 1, 2
    glob = torch.tensor([[0.4, 0.0, 0.1, 0.5]])                     # the pooled query's picks: 3, 0
    dense = torch.eye(N)[None]
    feats, top = subregion_features(dense, attn, k=2, global_attn=glob)
    assert top.tolist() == [[3, 0]]
    rows = attn[0, 1:, 1:][[3, 0]]
    assert torch.allclose(feats[0], F.normalize(rows / rows.sum(-1, keepdim=True), dim=-1))
    with pytest.raises(ValueError, match="global attention"):
        subregion_features(dense, attn, k=2, global_attn=glob[:, :3])


@pytest.mark.parametrize("recipe", ["coca", "clip"])
def test_global_attention_is_the_pooled_query_for_coca_and_the_cls_row_for_clip(recipe):
    """MacCap's subregions start from the patches the global embedding's token attends to most: for a
    CoCa backbone that is the attentional pooler's contrastive query (the ViT's cls output is not trained),
    for CLIP the cls row of the ViT's last-layer attention."""
    from finealign.models.factory import build_model
    torch.manual_seed(0)
    cfg = load_config(recipe)
    m = build_model(cfg.model, 64).eval()
    S = cfg.model.image_size
    with torch.no_grad():
        _, patches, attn = m.visual(torch.randn(3, 3, S, S), return_attn="full")
        got = m.global_attention(patches, attn)
        if recipe == "clip":
            want = attn[:, 0, 1:]
        else:                                   # softmax(q0 k^T / sqrt(Dh)) per head, averaged over heads
            P = m.pooler
            H = P.attn.heads
            q = P.attn.q(P.ln_q(P.query[:1])).view(H, -1)                                # (H, Dh)
            k = P.attn.kv(P.ln_kv(patches))[..., :q.numel()].view(3, patches.shape[1], H, -1)
            want = torch.softmax(torch.einsum("hd,bnhd->bhn", q, k) / q.shape[-1] ** 0.5, -1).mean(1)
            assert not torch.allclose(got, attn[:, 0, 1:], atol=1e-3)
            assert torch.allclose(got.sum(-1), torch.ones(3), atol=1e-5)
    assert got.shape == patches.shape[:2] and torch.allclose(got, want, atol=1e-6)


def test_rerank_returns_the_most_similar_candidate():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    cands = F.normalize(torch.tensor([[[0.0, 1.0], [1.0, 0.2], [1.0, 1.0]],
                                      [[1.0, 0.0], [0.3, 1.0], [0.1, 1.0]]]), dim=-1)
    assert rerank(img, cands).tolist() == [1, 2]


def test_maccap_config_checks():
    with pytest.raises(ConfigError, match="prefix_lm trains a MacCap model"):
        load_config("clip", ["objectives.prefix_lm.weight=1"])
    with pytest.raises(ConfigError, match="trains only objectives.prefix_lm"):
        load_config("maccap", ["objectives.itc.weight=1"])
    with pytest.raises(ConfigError, match="maccap.noise_var"):
        load_config("maccap", ["maccap.noise_var=-1"])


def _tiny_backbone(tmp_path):
    from finealign.train.loop import Trainer
    run = tmp_path / "backbone"
    cfg = load_config("clip", ["data.source=shapes", "data.num_samples=64", "data.batch_size=16", "train.steps=1",
                               "train.ckpt_every=0", "tokenizer.vocab_size=300", f"train.run_dir={run}"])
    Trainer(cfg, progress=False).train()
    return run


TINY_MACCAP = ["data.num_samples=64", "data.batch_size=8", "train.log_every=1", "maccap.adaptor_width=32",
               "maccap.adaptor_heads=2", "maccap.queries=4", "maccap.copies=3", "lm.width=32", "lm.layers=1",
               "lm.heads=2", "train.warmup=0", "train.lr=1e-3"]


def test_text_only_training_leaves_the_backbone_frozen_and_reloads(tmp_path, capsys):
    from finealign.api import load
    from finealign.train.loop import Trainer
    bb = _tiny_backbone(tmp_path)
    run = tmp_path / "maccap"
    cfg = load_config("maccap", TINY_MACCAP + [f"maccap.backbone={bb}", "train.steps=3", f"train.run_dir={run}"])
    t = Trainer(cfg, progress=False)
    before = {k: v.clone() for k, v in t.model.backbone.state_dict().items()}
    lm_before = t.model.lm.tok_embed.weight.clone()
    t.train()
    assert all(torch.equal(before[k], v) for k, v in t.model.backbone.state_dict().items())
    assert not torch.equal(lm_before, t.model.lm.tok_embed.weight)       # the own LM trains
    assert t.cfg.model.arch == "maccap" and t.cfg.model.vision_width == load(bb).config.model.vision_width
    m = load(run)
    images = torch.randn(2, 3, 32, 32)
    a = m.model.caption_images(images, strategy="greedy", max_new_tokens=4)
    b = t.model.eval().caption_images(images, strategy="greedy", max_new_tokens=4)
    assert a == b and len(a) == 2 and all(isinstance(c, str) for c in a)
    # zero-shot VQA decodes the prompt's continuation by beam search (MacCap: beam 5), 1 = greedy
    from finealign.zeroshot.lm import generate
    mc = m.model.eval()
    prefix = mc.adaptor(mc.image_memory(images, torch.Generator().manual_seed(0))[0])
    start = torch.tensor([mc.lm.prompt_ids("Question: what colour? Short answer:")])
    for beams, strategy in ((5, "beam"), (1, "greedy")):
        want = [mc.lm.decode(generate(mc.lm, prefix[i:i + 1], start, strategy, 5, beams)[0]).strip() for i in range(2)]
        assert mc.answer(images, ["what colour?"] * 2, beam_size=beams) == want
    with pytest.raises(ValueError, match="beam_size"):
        mc.answer(images, ["what colour?"] * 2, beam_size=0)
    # inference knobs change on a trained model (eval overrides reach it); the adaptor's shape cannot
    mc.set_inference(subregions=3, samples=1)
    assert mc.image_memory(images)[0].shape[:2] == (2, 3) and mc.mc.samples == 1
    mc.set_inference(subregions=0, noise_var=0.0)
    assert mc.image_memory(images)[0].shape[:2] == (2, mc.mc.copies) and mc.noise_var == 0.0
    with pytest.raises(ConfigError, match="maccap.queries is fixed by training"):
        mc.set_inference(queries=4)
    with pytest.raises(ConfigError, match="must be a number"):
        mc.set_inference(noise_var="auto")
    from PIL import Image
    from finealign.cli import main
    png = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (220, 40, 40)).save(png)
    assert main(["caption", str(run), "--zero-shot", "--decode", "greedy", str(png)]) == 0
    assert main(["caption", str(bb), "--zero-shot", str(png)]) == 2      # not a MacCap run: a clear error
    err = capsys.readouterr().err
    assert "--zero-shot needs a MacCap run" in err
    assert main(["eval", str(run), "--task", "caption", "maccap.adaptor_width=8", "--no-progress"]) == 2
    assert "maccap.adaptor_width is fixed by training" in capsys.readouterr().err
    assert main(["eval", str(bb), "--task", "retrieval", "maccap.subregions=0", "--no-progress"]) == 2
    assert "apply to MacCap runs" in capsys.readouterr().err


def test_hf_causal_lm_from_a_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from finealign.data.tokenizer import Tokenizer
    from finealign.train.loop import Trainer
    from finealign.zeroshot.lm import HFCausalLM, generate
    tok = Tokenizer.train(["a small red circle", "a large blue square on the left"] * 20, vocab_size=300)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.hf, bos_token="<bos>", eos_token="<eos>",
                                                  pad_token="<pad>", unk_token="<unk>")
    lm_dir = tmp_path / "tiny-gpt2"
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(lm_dir)
    hf_tok.save_pretrained(lm_dir)
    lm = HFCausalLM(lm_dir)
    ids, mask, start = lm.tokenize(["a small red circle"])
    assert start == 0 and ids[0, -1].item() == tok.eos_id and mask.all()
    assert all(not p.requires_grad for p in lm.parameters())          # frozen by default
    prefix = torch.randn(1, 4, 32)
    out = generate(lm, prefix, ids[:, :0], "greedy", max_new_tokens=5)
    assert len(out) == 1 and len(out[0]) <= 5
    # a MacCap run writes its prefix into the frozen HF LM
    bb = _tiny_backbone(tmp_path)
    run = tmp_path / "maccap-hf"
    cfg = load_config("maccap", TINY_MACCAP + [f"maccap.backbone={bb}", "train.steps=2", f"train.run_dir={run}",
                                               f"lm.path={lm_dir}"])
    t = Trainer(cfg, progress=False)
    w = t.model.lm.model.transformer.wte.weight.clone()
    t.train()
    assert torch.equal(w, t.model.lm.model.transformer.wte.weight)
    caps = t.model.eval().caption_images(torch.randn(2, 3, 32, 32), strategy="beam", beam_size=2, max_new_tokens=4)
    assert len(caps) == 2


def test_noise_var_auto_reads_the_backbones_measured_gap(tmp_path):
    import json
    from finealign.zeroshot.maccap import resolve_backbone
    bb = _tiny_backbone(tmp_path)
    cfg = load_config("maccap", TINY_MACCAP + [f"maccap.backbone={bb}", "maccap.noise_var=auto"])
    with pytest.raises(FileNotFoundError, match="finealign analyze gap"):
        resolve_backbone(cfg)
    (bb / "gap").mkdir()
    (bb / "gap" / "gap.json").write_text(json.dumps({"suggested_noise_var": 0.0123}))
    resolved, _ = resolve_backbone(cfg)
    assert resolved.maccap.noise_var == pytest.approx(0.0123) and resolved.model.arch == "maccap"


def test_text_only_captioner_names_the_colour_of_the_largest_object(tmp_path, shapes_clip):
    """Backbone: CLIP on shapes (conftest.py, data.seed 0); MacCap trained on the captions of other scenes
    (seed 1): greedy captions of unseen test images mention the largest object's colour far more often than
    the same captions shuffled across images (measured with this backbone: 83% vs 27%, and 73% vs 23% with
    train.seed=1; 39% vs 19% with 250 MacCap steps on an earlier backbone)."""
    from finealign.data.sources.shapes import make_scene, render
    from finealign.data.transforms import ImageTransform
    from finealign.train.loop import Trainer
    bb = shapes_clip.cfg.train.run_dir
    cfg = load_config("maccap", [f"maccap.backbone={bb}", "train.steps=400", "data.batch_size=32", "train.lr=1e-3",
                                 "train.warmup=50", "train.ckpt_every=0", "train.log_every=50",
                                 f"train.run_dir={tmp_path / 'mc'}", "maccap.adaptor_width=128", "maccap.adaptor_heads=4",
                                 "lm.width=128", "lm.layers=2", "maccap.subregions=0", "maccap.samples=1"])
    t = Trainer(cfg, progress=False)
    t.train()
    tf = ImageTransform(cfg.model.image_size, train=False)
    scenes = [make_scene(0, "test", i) for i in range(60)]
    images = torch.stack([tf(render(s)) for s in scenes])
    caps = t.model.eval().caption_images(images, strategy="greedy", max_new_tokens=16)
    colour = [s.objects[s.primary].colour for s in scenes]
    hit = sum(c in cap for c, cap in zip(colour, caps)) / len(caps)
    shuffled = sum(c in cap for c, cap in zip(colour, caps[1:] + caps[:1])) / len(caps)
    assert hit > shuffled + 0.25 and hit > 0.5, (hit, shuffled, caps[:3])


def test_aggregate_weights_the_subregions():
    g = torch.tensor([[1.0, 0.0]])
    sub = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    got = aggregate(g, sub, 0.5)
    # normalise(g + 0.5 s): [1, 0.5] / sqrt(1.25) and [1.5, 0] / 1.5
    want = torch.tensor([[[2 / 5 ** 0.5, 1 / 5 ** 0.5], [1.0, 0.0]]])
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(aggregate(g, sub, 0.0), torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), atol=1e-6)


def _random_maccap(**knobs):
    """A tiny MacCap over a random (untrained) CLIP backbone, built in well under a second."""
    from finealign.data.tokenizer import Tokenizer
    from finealign.models.factory import build_model
    cfg = load_config("maccap", TINY_MACCAP + ["model.image_pool=cls", "model.decoder_layers=0"])
    tok = Tokenizer.train(["a small red circle", "a large blue square on the left", "a green triangle"] * 20,
                          vocab_size=300)
    torch.manual_seed(0)
    m = build_model(cfg.model, tok.vocab_size, full=cfg, tokenizer=tok).eval()
    m.set_inference(**knobs)
    torch.manual_seed(1)
    images = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size)
    return m, images


def _clean_subregions(m, images):
    """g (B, E) and the k unit subregion features (B, k, E) of the backbone (features.py's definition)."""
    bb = m.backbone
    with torch.no_grad():
        cls, patches, attn = bb.visual(images, return_attn="full")
        g = bb.global_embed(cls, patches)
        sub, _ = subregion_features(bb.dense_image_embed(patches), attn, m.mc.subregions,
                                    bb.global_attention(patches, attn))
    return g, sub


def test_image_memory_uses_the_subregion_weight_without_noise():
    m, images = _random_maccap(subregions=3, noise_var=0.0)
    g, sub = _clean_subregions(m, images)
    mems = {}
    for w in (0.0, 0.5, 2.0):
        m.set_inference(subregion_weight=w)
        mem, g2 = m.image_memory(images, torch.Generator().manual_seed(0))
        assert torch.allclose(g2, g)
        assert torch.allclose(mem, F.normalize(g[:, None] + w * sub, dim=-1), atol=1e-5)
        mems[w] = mem
    # w = 0: every slot is the global embedding; the weight moves the memory towards the subregions
    assert torch.allclose(mems[0.0], F.normalize(g, dim=-1)[:, None].expand_as(mems[0.0]), atol=1e-5)
    assert not torch.allclose(mems[0.5], mems[0.0], atol=1e-3)
    assert not torch.allclose(mems[0.5], mems[2.0], atol=1e-3)


def test_image_memory_noises_the_subregion_features():
    var = 0.05
    m, images = _random_maccap(subregions=3, subregion_weight=0.5, noise_var=0.0)
    clean, _ = m.image_memory(images)
    m.set_inference(noise_var=var)
    a, _ = m.image_memory(images, torch.Generator().manual_seed(0))
    a2, _ = m.image_memory(images, torch.Generator().manual_seed(0))
    b, _ = m.image_memory(images, torch.Generator().manual_seed(1))
    B, k, E = clean.shape
    eps = torch.randn((B * k, 1, E), generator=torch.Generator().manual_seed(0)).view(B, k, E)
    assert torch.allclose(a, F.normalize(clean + var ** 0.5 * eps, dim=-1), atol=1e-5)
    assert torch.allclose(a.norm(dim=-1), torch.ones(B, k), atol=1e-5)
    assert not torch.allclose(a, clean, atol=1e-2)
    assert torch.equal(a, a2) and not torch.allclose(a, b, atol=1e-2)


def _recording(m):
    """Wrap the instance's image_memory / lm.decode to record calls and decoded candidates (in order)."""
    calls, texts = [], []
    memory, decode = m.image_memory, m.lm.decode

    def image_memory(*a, **kw):
        calls.append(1)
        return memory(*a, **kw)

    def dec(toks):
        texts.append(decode(toks))
        return texts[-1]
    m.image_memory, m.lm.decode = image_memory, dec
    return calls, texts


def test_caption_images_draws_one_candidate_per_sample():
    m, images = _random_maccap(subregions=3, noise_var=0.05, samples=3, rerank=False)
    calls, texts = _recording(m)
    out = m.caption_images(images, strategy="greedy", max_new_tokens=3)
    assert len(calls) == 3 and len(texts) == 3 * images.shape[0]
    assert out == texts[:images.shape[0]]            # no re-ranking: each image's first candidate


def test_caption_images_keeps_the_candidate_the_rerank_picks():
    B, S = 2, 4
    m, images = _random_maccap(subregions=3, noise_var=0.05, samples=S, rerank=True)
    calls, texts = _recording(m)
    out = m.caption_images(images, strategy="top_p", top_p=1.0, temperature=2.0, max_new_tokens=4,
                           generator=torch.Generator().manual_seed(3))
    assert len(calls) == S and len(texts) == S * B
    cands = [[texts[s * B + i] for s in range(S)] for i in range(B)]    # decoded sample by sample
    g = m.backbone.encode_image(images, memory=False)["embed"]
    best = []
    for i in range(B):
        ids, mask = m.tokenizer.encode_batch(cands[i], m.cfg.context_length)
        emb = m.backbone.encode_text(ids, mask)["embed"]                 # (S, E) unit-norm
        best.append(int((emb @ g[i]).argmax()))
    assert out == [cands[i][best[i]] for i in range(B)]
    assert any(b != 0 and cands[i][b] != cands[i][0] for i, b in enumerate(best))   # not simply the first
