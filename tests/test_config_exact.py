"""Exact rules of configuration layering and checking (config.py, config_checks.py, config_schema.py, registry.py).

Pins what the README's "Every verb takes `--help`" paragraph promises and test_config.py leaves open:
recipe lookup (``.yaml`` suffix, ``base:`` relative to the file before the bundled recipes), the recipe name
a path gives, shorthands in every layer (``objectives={...}``, ``extra=``, from_dict's ``mixer: NAME``),
``=null`` / ``=#`` / ``=|`` override values, duplicate YAML keys, type coercion (bools are not integers,
numbers become text for str keys, lists / mappings are required where the schema says so), every range
check at its boundary (the bound itself accepted, one step past it refused), capability refusals not covered
elsewhere, options of a switched-off mixer left unchecked, the registries, and ``EvalConfig.decoding``.
Every value here is worked out from the schema comments / docs, not read back from the code.
"""
from __future__ import annotations

import pytest
import yaml

from finealign.config import (CONFIG_DIR, Config, ConfigError, EvalConfig, find_recipe, from_dict, load_config,
                              load_recipe_dict, parse_overrides)
from finealign.config_checks import _check_options, teacher_readers
from finealign.registry import Registry


def ok(recipe, *overrides):
    return load_config(recipe, list(overrides))


def refused(recipe, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, list(overrides))


# ---------------------------------------------------------------- recipes and layering

def test_recipe_lookup_suffix_relative_base_and_recipe_name(tmp_path, monkeypatch):
    assert find_recipe("coca.yaml") == CONFIG_DIR / "coca.yaml"        # "NAME.yaml" names a bundled recipe too
    # a base is looked up beside the file first: a local coca.yaml shadows the bundled one
    (tmp_path / "coca.yaml").write_text("train: {steps: 11}\n")
    (tmp_path / "child.yaml").write_text("base: coca.yaml\ntrain: {warmup: 3}\n")
    cfg = load_config(str(tmp_path / "child.yaml"))
    assert (cfg.train.steps, cfg.train.warmup) == (11, 3) and "ic" not in cfg.objectives
    # a relative base that exists only beside the file (not in the cwd, not bundled)
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "parent_only_here.yaml").write_text("train: {steps: 5}\n")
    (sub / "kid.yaml").write_text("base: parent_only_here.yaml\n")
    assert load_config(str(sub / "kid.yaml")).train.steps == 5
    # ... and beside the file before the working directory
    (sub / "coca.yaml").write_text("train: {steps: 21}\n")
    (sub / "kid.yaml").write_text("base: coca.yaml\n")
    monkeypatch.chdir(tmp_path)                    # tmp_path/coca.yaml (steps 11) is now in the cwd
    assert load_config(str(sub / "kid.yaml")).train.steps == 21
    # the recipe name: a path gives its stem, a bundled name stays whole
    assert cfg.recipe == "child"
    assert load_config("ablations/sycoca/1-coca").recipe == "ablations/sycoca/1-coca"


def test_a_key_given_twice_in_a_recipe_is_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("train: {steps: 3}\ntrain: {steps: 4}\n")
    with pytest.raises(ConfigError, match="given twice"):
        load_config(str(p))


def test_objectives_mapping_override_and_extra_keep_the_recipes_options():
    base = ok("semmim").objectives["agreement"]
    assert base["teacher_temp_warmup"] == 300
    for cfg in (ok("semmim", "objectives={agreement: 0.5}"),
                load_config("semmim", extra={"objectives": {"agreement": 0.5}})):
        assert cfg.objectives["agreement"] == {**base, "weight": 0.5}
    # from_dict (the Python API) reads `mixer: NAME` and `objectives.NAME: w` shorthands as well
    cfg = from_dict({"mixer": "cutmix", "objectives": {"itc": 1, "mixed_itc": 2}})
    assert cfg.mixer.type == "cutmix" and cfg.objectives["mixed_itc"] == {"weight": 2.0}
    assert cfg.mixer.side == [0.35, 0.75] and cfg.mixer.stop == 0.667      # the schema defaults stay


def test_null_switches_an_objective_off_and_a_bool_is_not_a_weight():
    cfg = ok("coca", "objectives.ic=null")
    assert cfg.objectives["ic"]["weight"] == 0.0 and list(cfg.active_objectives()) == ["itc"]
    assert list(ok("coca", "objectives.ic=~").active_objectives()) == ["itc"]
    assert list(ok("coca", "objectives.ic=0").active_objectives()) == ["itc"]
    with pytest.raises(ConfigError, match="objectives.ic must be a mapping"):
        load_config("coca", ["objectives.ic=true"])
    with pytest.raises(ConfigError, match=r"objectives\.itc\.weight must be a number"):
        load_config("coca", ["objectives.itc.weight=true"])


def test_yaml_syntax_characters_are_text_values():
    assert parse_overrides(["data.separator=#", "data.val=|", "data.test=%"]) == {
        "data": {"separator": "#", "val": "|", "test": "%"}}
    assert parse_overrides(["a=~", "b=null", "c="]) == {"a": None, "b": None, "c": ""}
    with pytest.raises(ConfigError, match="invalid YAML value"):    # three characters are not a separator
        parse_overrides(["data.separator=%%%"])
    with pytest.raises(ConfigError, match="overrides must be a list"):
        load_config("coca", "train.steps=3")


def test_type_coercion():
    cfg = ok("coca", "data.train=2017", "train.lr=3", "train.dist_timeout=1e2")
    assert cfg.data.train == "2017" and cfg.train.lr == 3.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.dist_timeout == 100.0          # YAML 1.1 reads "1e2" as text: still a number
    refused("coca", ["train.steps=true"], "train.steps' expects an integer")
    refused("coca", ["eval.tasks=retrieval"], "eval.tasks' expects a list")
    refused("coca", ["masking.mlm=0.5"], "masking.mlm' expects a mapping")
    refused("coca", ["model.mim_text=1"], "model.mim_text' expects bool")
    refused("coca", ["train.lr=fast"], "train.lr' expects a number")
    # a float key took a bool, null or list unchanged (train.lr=true trained at lr True == 1.0)
    refused("coca", ["train.lr=true"], "train.lr' expects a number, got True")
    refused("coca", ["mixer.alpha=false"], "mixer.alpha' expects a number, got False")
    refused("coca", ["train.clip_grad=null"], "train.clip_grad' expects a number, got None")
    refused("coca", ["train.lr=[1]"], r"train.lr' expects a number, got \[1\]")


def test_active_objectives_and_decoding():
    cfg = from_dict({"objectives": {"itc": {}, "ic": {"weight": 0}}})
    assert cfg.active_objectives() == {"itc": {}}                 # no weight key: weight 1, active
    assert Config().objectives == {"itc": {"weight": 1.0}}
    ev = EvalConfig(decode="top_p", beam_size=2, top_p=0.8, temperature=0.6, max_new_tokens=7)
    assert ev.decoding() == {"strategy": "top_p", "max_new_tokens": 7, "beam_size": 2, "top_p": 0.8,
                             "temperature": 0.6}


# ---------------------------------------------------------------- range checks at their bounds

@pytest.mark.parametrize("good, bad, match", [
    ("data.batch_size=1", "data.batch_size=0", r"data.batch_size must be >= 1, got 0"),
    ("model.context_length=3", "model.context_length=2", r"model.context_length must be >= 3"),
    ("tokenizer.vocab_size=8", "tokenizer.vocab_size=7", r"tokenizer.vocab_size must be >= 8"),
    ("train.beta1=0", "train.beta1=1", r"train.beta1 must be in \[0, 1\)"),
    ("eval.top_p=1", "eval.top_p=0", r"eval.top_p must be in \(0, 1\]"),
    ("train.dist_timeout=0.5", "train.dist_timeout=0", "dist_timeout must be > 0"),
    ("data.fraction=1", "data.fraction=0", r"data.fraction must be in \(0, 1\]"),
    ("eval.k_test=0", "eval.k_test=-1", "eval.k_test must be >= 0"),
    ("eval.vqa_beam_size=1", "eval.vqa_beam_size=0", "vqa_beam_size must be >= 1"),
    ("data.views=1", "data.views=3", "data.views must be 1 or 2"),
    ("model.image_size=36", "model.image_size=34", r"image_size \(34\) must be a multiple of model.patch_size"),
    ("model.pta_block=3", "model.pta_block=4", r"model.pta_block must be in 0..3"),
])
def test_bounds(good, bad, match):
    ok("clip", good)
    refused("clip", [bad], match)


def test_bounds_of_switched_on_parts():
    mix = ("objectives.mixed_itc=1", "mixer=cutmix")
    ok("clip", *mix, "mixer.side=[0.5, 0.5]", "mixer.stop=1", "mixer.alpha=0.01")
    ok("clip", *mix, "mixer.side=[0.5, 1.0]")
    refused("clip", [*mix, "mixer.alpha=0"], "mixer.alpha must be > 0")
    refused("clip", [*mix, "mixer.side=[0.6, 0.5]"], "mixer.side must be")
    # the options of a part that is switched off are not checked
    ok("clip", "mixer.side=[0.9, 0.1]", "mixer.stop=5", "mixer.alpha=0")
    ok("clip", "data.semi_hard_band=[0.9, 0.1]", "data.refresh_every=-1", "data.refresh_embed=nope")
    semi = "data.sampler=semi_hard"
    ok("clip", semi, "data.semi_hard_band=[0.5, 0.5]", "data.refresh_every=0")
    refused("clip", [semi, "data.refresh_every=-1"], "refresh_every must be >= 0")
    sync = ("masking.sync={words: 0.0, patches: 0.99}", "masking.relevance=max")
    ok("albef", *sync)
    refused("albef", ["masking.sync={words: 1.0}"], r"masking.sync.words must be in \[0, 1\)")
    refused("albef", ["masking.sync={patches: 1.0}"], r"masking.sync.patches must be in \[0, 1\)")


def test_image_decoder_shape_checks():
    ok("sycoca", "model.mim_decoder_scale=4")
    refused("sycoca", ["model.mim_decoder_scale=4.5"], r"mim_decoder_scale must be in \(0, 4\]")
    refused("sycoca", ["model.mim_decoder_scale=0"], r"mim_decoder_scale must be in \(0, 4\]")
    # the width must split into the decoder's own heads when they are set (6 % 3 == 0 though 6 % 4 != 0)
    ok("sycoca", "model.mim_decoder_width=6", "model.mim_decoder_heads=3")
    refused("sycoca", ["model.mim_decoder_width=6"], r"multiple of the image decoder's heads \(4\)")
    refused("sycoca", ["masking.mim={type: nosuch}"], "masking.mim: ")
    refused("albef", ["masking.mlm.p=0.1"], r"masking.mlm: unknown option\(s\) \['p'\]")


def test_maccap_bounds():
    ok("maccap", "maccap.subregions=0", "maccap.samples=1")
    refused("maccap", ["maccap.subregions=-1"], "maccap.subregions must be >= 0")
    refused("maccap", ["lm.width=10", "lm.heads=4"], r"lm.width \(10\) must be divisible")
    # an HF LM brings its own width / heads: the own LM's numbers are not checked
    cfg = from_dict({"model": {"arch": "maccap"}, "objectives": {"prefix_lm": 1},
                     "lm": {"path": "some/hf-lm", "width": 10, "heads": 4}})
    assert cfg.lm.width == 10


# ---------------------------------------------------------------- refusals of settings the model would ignore

def test_refusals_not_covered_elsewhere():
    refused("clip", ["objectives.ic=1"], "objectives.ic trains a caption decoder")   # coca, decoder_layers 0
    refused("coca", ["objectives.itm=1"], "objectives.itm runs on the fusion model")
    refused("albef", ["model.queue_size=-1"], r"model.queue_size must be >= 0")
    refused("albef", ["model.text_pool=eos"], "fusion arch pools its")
    # knobs the fusion model would ignore: it always embeds its [CLS] token and needs a fusion layer for the image
    refused("albef", ["model.image_pool=attn"], r"fusion arch embeds its \[CLS\] token")
    refused("albef", ["model.fusion_layers=0"], "model.fusion_layers must be >= 1 for the fusion arch")
    ok("albef", "model.fusion_layers=1")
    refused("coca", ["model.image_pool=max"], "model.image_pool must be attn or cls, got 'max'")
    refused("timix", ["model.pta_width=3"], r"model.pta_width must be 0 \(= model.vision_width\) or >= 4")
    ok("timix", "model.pta_width=4")
    refused("albef", ["model.prototypes=8", "model.mim_target=semantic", "model.momentum=0",
                      "objectives.itc.distill_alpha=0"], "mim_target=semantic needs")
    refused("coca", ["data.num_samples=10"], "data.num_samples sizes a procedural source")
    ok("coca", "data.source=shapes", "data.num_samples=10")
    # a PTA head that mixer scores would read though no objective trains it
    refused("timix", ["objectives.pta=0"], "no objective trains it")
    ok("timix", "objectives.pta=0", "mixer.scores=relevance")


def test_streaming_resample_needs_shard_split():
    refused("coca", ["data.resample=true", "data.epoch_batches=4", "data.shard_split=false"],
            "it needs data.shard_split auto or true")
    ok("coca", "data.resample=true", "data.epoch_batches=4", "data.shard_split=true")


def test_teacher_readers_name_what_reads_the_teacher():
    assert teacher_readers(ok("albef")) == ["objectives.itc.distill_alpha > 0"]
    semmim = ok("semmim")
    assert "objectives.agreement" in teacher_readers(semmim)
    no_agree = ok("semmim", "objectives.agreement=0", "data.views=1")
    assert "objectives.agreement" not in teacher_readers(no_agree)


def test_objective_options_with_var_keyword_are_not_checked():
    class Loose:
        def __init__(self, a=1, **kw):
            pass

    class Strict:
        def __init__(self, a=1, *args):
            pass

    _check_options("loose", Loose, {"weight": 1, "anything": 2})
    _check_options("strict", Strict, {"weight": 1, "a": 2})
    with pytest.raises(ConfigError, match=r"objectives\.strict\.args: unknown option"):
        _check_options("strict", Strict, {"args": 2})


# ---------------------------------------------------------------- registries

def test_registry():
    reg = Registry("widget")
    reg.register("zeta")(int)
    reg.register("alpha")(str)
    assert reg.names() == ["alpha", "zeta"] and "alpha" in reg and "beta" not in reg
    assert reg.get("zeta") is int
    with pytest.raises(KeyError, match="widget 'alpha' is already registered"):
        reg.register("alpha")(float)
    assert reg.get("alpha") is str
    with pytest.raises(KeyError, match=r"unknown widget 'zetta'; did you mean 'zeta'\? \(known: alpha, zeta\)"):
        reg.get("zetta")


def test_recipe_dict_keeps_base_keys_and_dumps_plain(tmp_path):
    (tmp_path / "r.yaml").write_text("base: albef\nmasking: {mlm: {prob: 0.3}}\n")
    raw = load_recipe_dict(str(tmp_path / "r.yaml"))
    assert "base" not in raw and raw["masking"]["mlm"] == {"prob": 0.3} and raw["model"]["arch"] == "fusion"
    cfg = ok("albef", "objectives.mlm.weight=0", "masking.mlm={}", "masking.ic={}")
    assert yaml.safe_load(cfg.to_yaml())["masking"]["mlm"] == {}
