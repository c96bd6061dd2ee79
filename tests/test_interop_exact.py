"""Exact, fast pins of finealign interop (hf_clip.py, hf_text.py, export.py).

The CLIPModel config and state-dict conversion are checked against the table in hf_clip's docstring (synthetic
tensors, no transformers needed), the HF text tower's config resolution and length limit against their rules,
and the export's file rules on the ``tiny_clip`` fixture (an untrained tiny CLIP).
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_CLIP

from finealign.config import ConfigError, load_config
from finealign.interop import hf_clip as H
from finealign.interop.export import ExportError, export, is_export_dir, load_export
from finealign.interop.hf_text import resolve_text_tower


# ---------------------------------------------------------------- hf_clip.py
def _hf_cfg(**over):
    v = dict(image_size=16, patch_size=4, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
             num_attention_heads=5)
    t = dict(vocab_size=60, max_position_embeddings=12, hidden_size=32, intermediate_size=48,
             num_hidden_layers=3, num_attention_heads=4)
    return {"model_type": "clip", "vision_config": {**v, **over.pop("v", {})},
            "text_config": {**t, **over.pop("t", {})}, **over}


def test_clip_model_config_table():
    m = H.clip_model_config(_hf_cfg(projection_dim=24))
    assert m == {"arch": "coca", "image_pool": "cls", "decoder_layers": 0, "image_size": 16, "patch_size": 4,
                 "vision_width": 40, "vision_layers": 2, "vision_heads": 5, "mlp_ratio": 1.8,
                 "text_width": 32, "text_layers": 3, "text_heads": 4, "text_mlp_ratio": 1.5,
                 "vocab_size": 60, "context_length": 12, "embed_dim": 24, "act": "quick_gelu",
                 "vision_ln_pre": True, "text_pool": "eos"}
    assert H.clip_model_config(_hf_cfg())["embed_dim"] == 512
    for act, ours in (("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh")):
        assert H.clip_model_config(_hf_cfg(v={"hidden_act": act}, t={"hidden_act": act}))["act"] == ours
    bad = [_hf_cfg(v={"hidden_act": "gelu"}),                             # the towers disagree
           _hf_cfg(v={"hidden_act": "relu"}, t={"hidden_act": "relu"}),
           _hf_cfg(t={"hidden_size": 11, "intermediate_size": 15}),    # int(11 * (15/11)) == 14
           {**_hf_cfg(), "model_type": "bert"}, _hf_cfg(v={"layer_norm_eps": 1e-6})]
    for hf in bad:
        with pytest.raises(H.HFConversionError):
            H.clip_model_config(hf)
    del (missing := _hf_cfg())["vision_config"]["patch_size"]
    with pytest.raises(H.HFConversionError, match="lacks"):
        H.clip_model_config(missing)


def _hf_sd(D=6, p=2, N=4, C=5, V=7, E=3, Dt=4, L=1):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"vision_model.embeddings.class_embedding": r(D),
          "vision_model.embeddings.patch_embedding.weight": r(D, 3, p, p),
          "vision_model.embeddings.position_embedding.weight": r(1 + N, D),
          "vision_model.embeddings.position_ids": torch.arange(1 + N)[None],
          "text_model.embeddings.token_embedding.weight": r(V, Dt),
          "text_model.embeddings.position_embedding.weight": r(C, Dt),
          "visual_projection.weight": r(E, D), "text_projection.weight": r(E, Dt), "logit_scale": r(())}
    for tower, w in (("vision_model", D), ("text_model", Dt)):
        for n in (("pre_layrnorm", "post_layernorm") if tower == "vision_model" else ("final_layer_norm",)):
            sd[f"{tower}.{n}.weight"], sd[f"{tower}.{n}.bias"] = r(w), r(w)
        for i in range(L):
            a = f"{tower}.encoder.layers.{i}"
            for lin, shape in (("self_attn.q_proj", (w, w)), ("self_attn.k_proj", (w, w)),
                               ("self_attn.v_proj", (w, w)), ("self_attn.out_proj", (w, w)),
                               ("mlp.fc1", (2 * w, w)), ("mlp.fc2", (w, 2 * w))):
                sd[f"{a}.{lin}.weight"], sd[f"{a}.{lin}.bias"] = r(*shape), r(shape[0])
            for n in ("layer_norm1", "layer_norm2"):
                sd[f"{a}.{n}.weight"], sd[f"{a}.{n}.bias"] = r(w), r(w)
    return sd


def test_convert_clip_state_dict_mapping():
    sd = _hf_sd()
    out = H.convert_clip_state_dict(dict(sd), 1, 1)
    V, T = "vision_model", "text_model"
    assert torch.equal(out["visual.cls_token"], sd[f"{V}.embeddings.class_embedding"].reshape(1, 1, 6))
    conv = sd[f"{V}.embeddings.patch_embedding.weight"]
    assert torch.equal(out["visual.patch_embed.weight"][2], conv[2].flatten())          # (C, p, p) order
    assert torch.equal(out["visual.patch_embed.bias"], torch.zeros(6))
    assert torch.equal(out["visual.pos_embed"][0], sd[f"{V}.embeddings.position_embedding.weight"])
    assert torch.equal(out["text.pos_embed"][0], sd[f"{T}.embeddings.position_embedding.weight"])
    for tower, ours in ((V, "visual"), (T, "text")):
        a, b = f"{tower}.encoder.layers.0", f"{ours}.blocks.0"
        for kind in ("weight", "bias"):
            want = torch.cat([sd[f"{a}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
            assert torch.equal(out[f"{b}.attn.qkv.{kind}"], want)
            assert torch.equal(out[f"{b}.attn.proj.{kind}"], sd[f"{a}.self_attn.out_proj.{kind}"])
            assert torch.equal(out[f"{b}.mlp.fc.{kind}"], sd[f"{a}.mlp.fc1.{kind}"])
            assert torch.equal(out[f"{b}.mlp.proj.{kind}"], sd[f"{a}.mlp.fc2.{kind}"])
            assert torch.equal(out[f"{b}.ln_1.{kind}"], sd[f"{a}.layer_norm1.{kind}"])
            assert torch.equal(out[f"{b}.ln_2.{kind}"], sd[f"{a}.layer_norm2.{kind}"])
    assert torch.equal(out["visual.ln_pre.weight"], sd[f"{V}.pre_layrnorm.weight"])
    assert torch.equal(out["visual.ln_post.bias"], sd[f"{V}.post_layernorm.bias"])
    assert torch.equal(out["text.ln_final.weight"], sd[f"{T}.final_layer_norm.weight"])
    assert torch.equal(out["image_proj.weight"], sd["visual_projection.weight"])
    assert torch.equal(out["text_proj.weight"], sd["text_projection.weight"])
    assert out["logit_scale"].shape == () and out["logit_scale"] == sd["logit_scale"]
    with pytest.raises(H.HFConversionError, match="not used by the conversion: \\['extra.w'\\]"):
        H.convert_clip_state_dict({**sd, "extra.w": torch.zeros(1)}, 1, 1)
    with pytest.raises(H.HFConversionError, match="lack 'logit_scale'"):
        H.convert_clip_state_dict({k: v for k, v in sd.items() if k != "logit_scale"}, 1, 1)


def test_read_hf_weights_sharded_and_bin(tmp_path):
    from safetensors.torch import save_file
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "s2.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    sd = H.read_hf_weights(tmp_path)
    assert sorted(sd) == ["a", "b"] and torch.equal(sd["b"], torch.zeros(3))
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"c": torch.arange(3)}, d / "pytorch_model.bin")
    assert torch.equal(H.read_hf_weights(d)["c"], torch.arange(3))
    with pytest.raises(H.HFConversionError, match="not valid JSON"):
        (d / "config.json").write_text("{")
        H.read_hf_config(d)


# ---------------------------------------------------------------- hf_text.py
def test_resolve_text_tower_rules(tmp_path):
    d = tmp_path / "enc"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 24,
                                               "max_position_embeddings": 32}))
    (d / "tokenizer.json").write_text("{}")
    cfg = load_config("clip", TINY_CLIP)
    cfg.model.text_path = str(d)
    cfg.tokenizer.path = ""
    resolve_text_tower(cfg)                                   # context_length 32 == max_position_embeddings
    assert cfg.model.text_width == 24 and cfg.tokenizer.path == str(d)
    assert cfg.model.text_hf_config["hidden_size"] == 24
    cfg.model.text_path, cfg.tokenizer.path = str(tmp_path / "gone"), "mine"
    cfg.model.text_hf_config = {"model_type": "bert", "hidden_size": 8}       # a stored config wins
    resolve_text_tower(cfg)
    assert cfg.model.text_width == 8 and cfg.tokenizer.path == "mine"
    for hc in ({"model_type": "bert", "hidden_size": 8, "max_position_embeddings": 31},
               {"model_type": "clip", "hidden_size": 8}, {"model_type": "bert"}):
        cfg.model.text_hf_config = hc
        with pytest.raises(ConfigError):
            resolve_text_tower(cfg)
    cfg.model.text_hf_config, cfg.tokenizer.path = {"model_type": "bert", "hidden_size": 8}, ""
    with pytest.raises(ConfigError, match="tokenizer"):
        resolve_text_tower(cfg)


def test_hf_text_tower_length_limit_mask_default_and_no_pooler():
    pytest.importorskip("transformers")
    from finealign.interop.hf_text import HFTextTower
    cfg = load_config("clip", TINY_CLIP).model
    cfg.text_hf_config = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 30,
                          "max_position_embeddings": 8}
    cfg.context_length, cfg.text_pool = 6, "mean"
    torch.manual_seed(0)
    tower = HFTextTower(cfg, pretrained=False).eval()
    assert tower.hf.pooler is None and tower.width == 8
    ids = torch.randint(1, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, tokens = tower(ids)
        pooled2, _ = tower(ids, torch.ones(2, 6, dtype=torch.bool))
        assert tokens.shape == (2, 6, 8)
        torch.testing.assert_close(pooled, tokens.mean(1))
        torch.testing.assert_close(pooled, pooled2)
        with pytest.raises(ValueError, match="exceeds context_length 6"):
            tower(torch.ones(1, 7, dtype=torch.long))


# ---------------------------------------------------------------- export.py
def test_is_export_dir_rules(tmp_path):
    assert not is_export_dir(tmp_path / "none")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not is_export_dir(tmp_path)
    (tmp_path / "config.yaml").write_text("")
    assert is_export_dir(tmp_path)                            # hand-made
    for ck in ("meta.json", "state.pt"):
        (tmp_path / ck).write_text("")
        assert not is_export_dir(tmp_path), ck                # a checkpoint, not an export
        (tmp_path / ck).unlink()
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "export.json").write_text("{}")
    assert is_export_dir(tmp_path)


def test_export_files_modes_marker_and_reload(tiny_clip, tmp_path):
    from finealign.train.checkpoint import _sha256
    out = export(tiny_clip, tmp_path / "ex")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "export.json", "model.safetensors",
                                                     "tokenizer.json"]      # no temporary files left
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
    marker = json.loads((out / "export.json").read_text())
    assert marker["format"] == "finealign-export" and marker["version"] == 1
    assert marker["files"] == {n: _sha256(out / n) for n in ("model.safetensors", "config.yaml", "tokenizer.json")}
    b = load_export(out)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(b.model.encode_image(x)["embed"], tiny_clip.model.encode_image(x)["embed"])
    with pytest.raises(ExportError, match="already holds an export"):
        export(tiny_clip, out)
    (out / "export.json").unlink()
    (out / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="no model.vocab_size"):
        load_export(out)
