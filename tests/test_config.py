import pytest
import yaml

from finealign.config import ConfigError, find_recipe, from_dict, load_config, merge, parse_overrides


def test_recipe_and_overrides_resolve():
    cfg = load_config("coca", ["train.steps=200", "model.vision_width=256", "eval.tasks=[retrieval]",
                               "train.lr=2e-3"])
    assert cfg.train.lr == 0.002
    assert cfg.train.steps == 200
    assert cfg.model.vision_width == 256
    assert cfg.model.patch_size == 4            # from the tiny preset
    assert cfg.eval.tasks == ["retrieval"]
    assert cfg.active_objectives() == {"itc": {"weight": 1.0}, "ic": {"weight": 2.0}}
    assert cfg.recipe == "coca"


def test_preset_then_recipe_then_cli_order():
    cfg = load_config("coca", ["model.preset=bench-tiny", "model.vision_layers=2"])
    assert cfg.model.image_size == 64 and cfg.model.vocab_size == 8192   # preset
    assert cfg.model.vision_layers == 2                                    # CLI wins over preset


def test_clip_recipe_has_no_decoder():
    cfg = load_config("clip")
    assert cfg.model.decoder_layers == 0 and cfg.model.image_pool == "cls"
    assert list(cfg.active_objectives()) == ["itc"]


@pytest.mark.parametrize("override,bad,expected", [
    ("train.stpes=3", "train.stpes", "train.steps"),
    ("modle.width=3", "modle", "model"),
    ("model.vision_widht=3", "model.vision_widht", "model.vision_width"),
])
def test_unknown_key_names_closest(override, bad, expected):
    with pytest.raises(ConfigError) as e:
        load_config("coca", [override])
    assert f"unknown config key '{bad}'; did you mean '{expected}'?" == str(e.value)


def test_unknown_objective_and_recipe_and_preset():
    with pytest.raises(KeyError, match="did you mean 'itc'"):
        load_config("coca", ["objectives.itcc.weight=1"])
    with pytest.raises(ConfigError, match="did you mean 'coca'"):
        load_config("cocaa")
    with pytest.raises(ConfigError, match="unknown model preset 'tinyy'.*did you mean 'tiny'"):
        load_config("coca", ["model.preset=tinyy"])


def test_type_errors_are_named():
    with pytest.raises(ConfigError, match="train.steps"):
        load_config("coca", ["train.steps=lots"])
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config("coca", ["data.batch_size=10", "train.grad_accum=3"])


def test_weight_zero_switches_off():
    cfg = load_config("coca", ["objectives.ic.weight=0"])
    assert list(cfg.active_objectives()) == ["itc"]


def test_recipe_base_and_yaml_safety(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: coca\ntrain: {steps: 7}\n")
    cfg = load_config(str(child))
    assert cfg.train.steps == 7 and "ic" in cfg.objectives
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(evil))
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text(f"base: {cyc}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(cyc))


def test_parse_overrides_nested_and_typed():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=true"]) == {
        "a": {"b": 1, "c": "x"}, "d": [1, 2], "e": True}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_misspelt_objective_option_is_named_at_load_time():
    with pytest.raises(ConfigError, match=r"objectives\.itc\.wieght: unknown option; did you mean 'weight'"):
        load_config("clip", ["objectives.itc.wieght=1"])
    with pytest.raises(ConfigError, match=r"objectives\.ic\.smoothing: .*ic takes: weight, label_smoothing"):
        load_config("coca", ["objectives.ic.smoothing=0.1"])
    assert load_config("coca", ["objectives.ic.label_smoothing=0.1"]).objectives["ic"]["label_smoothing"] == 0.1


def test_bundled_recipes_all_load():
    from finealign.config import bundled_recipes
    recipes = bundled_recipes()
    assert len(recipes) > 30 and not any(p.name == "_study.yaml" for p in recipes)
    for p in recipes:
        load_config(str(p))
    assert find_recipe("quickstart").name == "quickstart.yaml"


def test_shorthands_set_one_key_and_keep_the_recipes_others(tmp_path):
    """`objectives.NAME=w` sets the weight and `mixer=NAME` the type; the recipe's other options stay, in
    overrides (either order) and in a derived recipe's YAML."""
    cfg = load_config("semmim", ["objectives.agreement=0.5"])
    assert cfg.objectives["agreement"]["weight"] == 0.5
    assert cfg.objectives["agreement"]["teacher_temp_warmup"] == load_config("semmim").objectives["agreement"][
        "teacher_temp_warmup"] == 300
    for order in (["mixer.stop=0.3", "mixer=cutmix"], ["mixer=cutmix", "mixer.stop=0.3"]):
        mixer = load_config("timix", [*order, "mixer.side=[0.25, 0.5]"]).mixer
        assert (mixer.type, mixer.stop, mixer.side) == ("cutmix", 0.3, [0.25, 0.5])
    assert load_config("timix", ["mixer.alpha=0.2", "mixer=mixup"]).mixer.alpha == 0.2
    (tmp_path / "r.yaml").write_text("base: semmim\nobjectives: {agreement: 2, mixed_itc: 1}\nmixer: cutmix\n")
    cfg = load_config(str(tmp_path / "r.yaml"))
    assert cfg.objectives["agreement"]["weight"] == 2.0 and cfg.objectives["agreement"]["teacher_temp_warmup"] == 300
    assert cfg.mixer.type == "cutmix"


@pytest.mark.parametrize("recipe, overrides, match", [
    ("clip", ["masking.ic={type: attentive, mask_ratio: 0.5, mask: least}"], "masking.ic picks the patches"),
    ("albef", ["masking.ic={type: random, mask_ratio: 0.5}"], "masking.ic picks the patches"),
    ("sycoca", ["model.arch=fusion"], "objectives.ic trains a caption decoder"),
    ("coca", ["model.momentum=0.995"], "model.momentum builds the fusion arch's EMA teacher"),
    ("albef", ["model.momentum=0", "objectives.itc.distill_alpha=0.4"], "distill_alpha > 0 distils"),
    ("coca", ["objectives.agreement.weight=1", "data.views=2"], "objectives.agreement runs on the fusion model"),
    ("clip", ["masking.mlm.prob=0.5"], "masking.mlm masks words for objectives.mlm"),
    ("clip", ["data.views=2"], "data.views=2 builds a second view for objectives.agreement"),
    ("albef", ["objectives.itc.distill_alpha=0", "model.queue_size=16"], "queue_size \\(16\\) queues the teacher"),
    ("sycoca", ["model.mim_inject=false"], "mim_inject=false is the fusion arch's"),
])
def test_settings_the_model_would_ignore_are_refused(recipe, overrides, match):
    """Each of these was accepted and silently changed nothing (or failed at step 1 with a vague hint)."""
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, overrides)


def test_missing_feature_error_names_what_produces_it():
    from finealign.objectives.base import require
    from finealign.types import Features
    with pytest.raises(ValueError, match="'teacher_image_embed'.*model.momentum > 0"):
        require(Features(), "teacher_image_embed", "itc")
    with pytest.raises(ValueError, match="'caption_logits'.*model.decoder_layers > 0"):
        require(Features(), "caption_logits", "ic")


def test_an_empty_mapping_override_clears_the_recipes_mapping():
    assert load_config("albef").masking.mlm == {"prob": 0.15}
    cleared = load_config("albef", ["objectives.mlm.weight=0", "masking.mlm={}"])
    assert cleared.masking.mlm == {} and "mlm: {}" in yaml.safe_dump(cleared.to_dict())   # dumps as plain YAML
    # an empty mapping built in code (not an override) still merges as a no-op
    assert from_dict(merge(load_config("albef").to_dict(), {"data": {}})).data.source == "emoji"
    assert load_config("albef", ["masking.mlm={prob: 0.3}"]).masking.mlm == {"prob": 0.3}
    assert load_config("albef", ["objectives.mlm.weight=0", "masking.mlm.prob=0.3", "masking.mlm={}"]).masking.mlm == {}
