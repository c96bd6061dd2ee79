"""Configuration: nested dataclasses, filled from defaults ⊕ model preset ⊕ recipe YAML ⊕ dotted CLI overrides.

The schema (every section's keys, defaults and comments) is config_schema.py; its names are re-exported
here. Recipes may name a ``base`` recipe (a path relative to the file or a bundled recipe name) that they
extend. Every key is checked: a mistyped key is an error naming it and the closest valid key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .config_schema import (Config, ConfigError, DataConfig, EvalConfig, LMConfig, MacCapConfig,
                            MaskingConfig, MixerConfig, ModelConfig, TokenizerConfig, TrainConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "LMConfig", "MacCapConfig", "MaskingConfig",
           "MixerConfig", "ModelConfig", "TokenizerConfig", "TrainConfig", "CONFIG_DIR", "PRESET_DIR",
           "bundled_recipes", "find_recipe", "merge", "load_recipe_dict", "parse_overrides", "load_preset",
           "from_dict", "validate", "load_config"]

CONFIG_DIR = Path(__file__).parent / "configs"
PRESET_DIR = Path(__file__).parent / "models" / "presets"


# ---------------------------------------------------------------- loading and merging

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)   # safe: a SafeLoader
    except (yaml.YAMLError, UnicodeDecodeError) as e:   # safe_load: a !!python tag is refused, not run
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    return data


def bundled_recipes() -> list[Path]:
    """Every recipe YAML in configs/ (a study's ``_study.yaml`` options are not recipes)."""
    return sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.name != "_study.yaml")


def find_recipe(name_or_path: str, relative_to: Path | None = None) -> Path:
    """A recipe is a YAML path, or a name in the bundled configs/ (``coca``, ``ablations/sycoca/1-coca``)."""
    cands = [Path(name_or_path)]
    if relative_to is not None:
        cands.insert(0, relative_to / name_or_path)
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    cands.append(CONFIG_DIR / f"{stem}.yaml")
    for c in cands:
        if c.is_file():
            return c
    known = [str(p.relative_to(CONFIG_DIR))[:-5] for p in bundled_recipes()]
    close = difflib.get_close_matches(stem, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    top = [k for k in known if "/" not in k]
    studies = sorted({k.rsplit("/", 1)[0] + "/..." for k in known if "/" in k})
    raise ConfigError(f"no recipe {name_or_path!r}{hint} (bundled: {', '.join(top + studies)}; "
                      f"`finealign recipes` lists them all)")


def _expand(parts: list[str], value: Any) -> Any:
    """The shorthands ``objectives.NAME: 1.0`` (= ``{weight: 1.0}``) and ``mixer: timix`` (= ``{type: timix}``)
    as the mappings they stand for, so that merging one over a recipe sets that key and keeps the others."""
    if parts == ["mixer"] and isinstance(value, str):
        return {"type": value}
    if len(parts) == 2 and parts[0] == "objectives" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"weight": float(value)}
    if parts == ["objectives"] and isinstance(value, dict):
        return {k: _expand(["objectives", k], v) for k, v in value.items()}
    if not parts and isinstance(value, dict):
        return {k: _expand([k], v) for k, v in value.items()}
    return value


class Cleared(dict):
    """An override's empty mapping (``masking.mlm={}``): it replaces the recipe's mapping, where merging a
    plain empty dict would change nothing."""


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``, mappings key by key (a :class:`Cleared` mapping replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and not isinstance(v, Cleared) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = _plain(v)
    return out


def _plain(v: Any) -> Any:
    """A deep copy with every :class:`Cleared` turned into a plain dict (configs are dumped as YAML)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return copy.deepcopy(v)


def load_recipe_dict(name_or_path: str, _seen: tuple = ()) -> dict[str, Any]:
    path = find_recipe(name_or_path, _seen[-1].parent if _seen else None).resolve()
    if path in _seen:
        raise ConfigError(f"recipe base cycle: {' -> '.join(map(str, _seen + (path,)))}")
    raw = _expand([], _load_yaml(path))
    if not raw:
        raise ConfigError(f"{path}: the recipe is empty (a recipe sets at least `base:` or one section)")
    base = raw.pop("base", None)
    if base:
        try:
            raw = merge(load_recipe_dict(str(base), _seen + (path,)), raw)
        except ConfigError as e:
            if str(e).startswith("no recipe"):
                raise ConfigError(f"{path}: base: {e}") from None
            raise
    return raw


#: the YAML spellings of null (``objectives.ic=null``); other values YAML reads as nothing stay text
NULLS = ("null", "Null", "NULL", "~")


def _plain_text(val: str) -> bool:
    """A short value YAML cannot parse that is plainly meant as text (a separator such as ``,`` or ``|``),
    not a mapping / list / tag."""
    v = val.strip()
    return 0 < len(v) <= 2 and not v.startswith(("!", "{", "["))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=200", "model.width=256"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, val = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ConfigError(f"override {item!r}: the key {key!r} has an empty part (want key.sub=value)")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier one")
        try:
            parsed = yaml.safe_load(val) if val != "" else ""
        except yaml.YAMLError as e:   # e.g. a !!python tag: refused, nothing constructed
            if not _plain_text(val):
                raise ConfigError(f"override {item!r}: invalid YAML value: {e}") from None
            parsed = val
        if parsed in (None, "") and val.strip() and val.strip() not in NULLS:
            parsed = val              # YAML syntax characters as text: data.separator=| (or #, ;)
        value = _expand(parts, parsed)
        value = Cleared() if value == {} else value
        old = node.get(parts[-1])
        # `mixer.alpha=0.2 mixer=mixup`: the shorthand adds its key to the earlier override's mapping
        combine = isinstance(old, dict) and isinstance(value, dict) and not isinstance(value, Cleared)
        node[parts[-1]] = merge(old, value) if combine else value
    return out


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model preset {name!r}{hint} (known: {', '.join(known)})")
    return _load_yaml(path)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{where}.{k}" if where else k
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        typ = hints[k]
        if dataclasses.is_dataclass(typ):
            kwargs[k] = _build(typ, v, key)
        else:
            kwargs[k] = _coerce(v, typ, key)
    return cls(**kwargs)


def _coerce(v: Any, typ: Any, key: str) -> Any:
    if typ is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if typ is float and isinstance(v, str):  # YAML 1.1 reads "2e-3" as a string
        try:
            return float(v)
        except ValueError:
            raise ConfigError(f"config key '{key}' expects a number, got {v!r}") from None
    if typ is float:                          # a bool, list, mapping or null is not a number
        raise ConfigError(f"config key '{key}' expects a number, got {v!r}")
    if typ is int and isinstance(v, bool):
        raise ConfigError(f"config key '{key}' expects an integer, got {v!r}")
    if typ in (int, bool, str) and not isinstance(v, typ):
        if typ is str and isinstance(v, (int, float)):
            return str(v)
        raise ConfigError(f"config key '{key}' expects {typ.__name__}, got {v!r}")
    if getattr(typ, "__origin__", None) is list and not isinstance(v, list):
        raise ConfigError(f"config key '{key}' expects a list, got {v!r}")
    if getattr(typ, "__origin__", None) is dict and not isinstance(v, dict):
        raise ConfigError(f"config key '{key}' expects a mapping, got {v!r}")
    return v


def from_dict(raw: dict[str, Any]) -> Config:
    raw = copy.deepcopy(raw)
    model = raw.get("model", {}) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping of model.* keys, got {model!r}")
    preset = model.get("preset", ModelConfig.preset)
    raw["model"] = merge({"preset": preset, **load_preset(preset)}, model)
    objectives = raw.get("objectives")
    if objectives is not None:
        if not isinstance(objectives, dict):
            raise ConfigError("'objectives' must map objective names to {weight: ..., ...}")
        # `name: 0.5` is a weight; `name: null` (objectives.ic=null) switches it off like weight 0
        raw["objectives"] = {k: ({"weight": float(v)} if isinstance(v, (int, float)) and not isinstance(v, bool)
                                 else {"weight": 0.0} if v is None else v)
                             for k, v in objectives.items()}
    if isinstance(raw.get("mixer"), str):          # `mixer: timix` shorthand
        raw["mixer"] = {"type": raw["mixer"]}
    cfg = _build(Config, raw, "")
    if cfg.model.text_tower == "hf":   # read the HF encoder's config.json (width, tokenizer) into the config
        from .interop.hf_text import resolve_text_tower
        resolve_text_tower(cfg)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks (config_checks.py); raises ConfigError naming the key."""
    from .config_checks import check
    check(cfg)


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if isinstance(overrides, str) or any(not isinstance(o, str) for o in overrides or ()):
        raise ConfigError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
    if recipe:
        recipe = os.fspath(recipe)
        raw = load_recipe_dict(recipe)
        raw.setdefault("recipe", Path(recipe).stem if recipe.endswith(".yaml") else recipe)
    if extra:
        raw = merge(raw, _expand([], extra))
    if overrides:
        raw = merge(raw, parse_overrides(overrides))
    return from_dict(raw)
