"""Cross-field configuration checks: each error names the key (and the fix) before anything is built."""
from __future__ import annotations

import difflib

from .config import ConfigError


def check(cfg) -> None:
    from .registry import OBJECTIVES
    from . import objectives as _  # noqa: F401  (registers the objectives)
    for name, opts in cfg.objectives.items():
        _check_options(name, OBJECTIVES.get(name), opts)  # get raises with a suggestion on a typo
    _check_ranges(cfg)
    if cfg.train.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision must be fp32 or bf16, got {cfg.train.precision!r}")
    if cfg.data.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by "
                          f"train.grad_accum ({cfg.train.grad_accum})")
    if cfg.train.optimizer not in ("auto", "foreach", "fused"):
        raise ConfigError(f"train.optimizer must be auto, foreach or fused, got {cfg.train.optimizer!r}")
    if cfg.train.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"train.strategy must be ddp or fsdp, got {cfg.train.strategy!r}")
    if cfg.train.local_loss and not cfg.train.gather_with_grad:
        raise ConfigError("train.local_loss=true needs train.gather_with_grad=true: without gradients through "
                          "the gathered features each rank's gradient misses the other ranks' rows (inexact)")
    if cfg.train.dist_timeout <= 0:
        raise ConfigError(f"train.dist_timeout must be > 0 seconds, got {cfg.train.dist_timeout}")
    if cfg.model.image_size % cfg.model.patch_size:
        raise ConfigError(f"model.image_size ({cfg.model.image_size}) must be a multiple of "
                          f"model.patch_size ({cfg.model.patch_size})")
    from .masking import build_masker
    for role in ("ic", "mim"):
        spec = getattr(cfg.masking, role)
        if spec:
            try:
                build_masker(spec)
            except (KeyError, ValueError) as e:
                raise ConfigError(f"masking.{role}: {e.args[0] if e.args else e}") from None
    if cfg.model.arch not in ("coca", "fusion", "maccap"):
        raise ConfigError(f"model.arch must be coca, fusion or maccap, got {cfg.model.arch!r}")
    _validate_maccap(cfg)
    _validate_towers(cfg)
    unknown = set(cfg.masking.mlm) - {"prob"}
    if unknown:
        raise ConfigError(f"masking.mlm: unknown option(s) {sorted(unknown)}; valid: ['prob']")
    if cfg.masking.relevance not in ("max", "mean", "attention"):
        raise ConfigError(f"masking.relevance must be max, mean or attention, got {cfg.masking.relevance!r}")
    if cfg.masking.relevance == "attention" and cfg.model.arch != "fusion":
        raise ConfigError("masking.relevance=attention reads fusion cross-attention: needs model.arch: fusion")
    m = cfg.model
    if m.mim_visible not in ("reencode", "shared"):
        raise ConfigError(f"model.mim_visible must be reencode or shared, got {m.mim_visible!r}")
    if m.mim_visible == "shared" and m.arch != "coca":
        raise ConfigError(f"model.mim_visible=shared is built for the CoCa arch (SyCoCa), not model.arch={m.arch}")
    if not 0 < m.mim_decoder_scale <= 4:
        raise ConfigError(f"model.mim_decoder_scale must be in (0, 4], got {m.mim_decoder_scale}")
    if m.mim_decoder_width and m.mim_decoder_width % (m.mim_decoder_heads or m.vision_heads):
        raise ConfigError(f"model.mim_decoder_width={m.mim_decoder_width} must be a multiple of the image "
                          f"decoder's heads ({m.mim_decoder_heads or m.vision_heads})")
    if m.masked_pass not in ("joint", "separate"):
        raise ConfigError(f"model.masked_pass must be joint or separate, got {m.masked_pass!r}")
    if m.masked_pass == "separate" and m.arch != "fusion":
        raise ConfigError("model.masked_pass=separate is the fusion arch's choice of MLM / MIM passes; "
                          f"model.arch={m.arch} has no fusion MLM")
    if m.mim_target not in ("pixel", "semantic"):
        raise ConfigError(f"model.mim_target must be pixel or semantic, got {m.mim_target!r}")
    if m.mim_target == "semantic" and not (m.arch == "fusion" and m.prototypes > 0 and m.momentum > 0):
        raise ConfigError("model.mim_target=semantic needs model.arch: fusion, model.prototypes > 0 and "
                          "model.momentum > 0 (targets come from the teacher's prototype head)")
    if m.mim_target == "semantic" and {"mim", "tg_mim"} & set(cfg.active_objectives()):
        raise ConfigError("model.mim_target=semantic predicts prototype logits: use objectives.semantic_mim, "
                          "not the pixel objectives mim / tg_mim")
    if m.prototypes and m.arch != "fusion":
        raise ConfigError("model.prototypes needs model.arch: fusion")
    if cfg.data.views not in (1, 2):
        raise ConfigError(f"data.views must be 1 or 2, got {cfg.data.views}")
    if cfg.model.mim_decoder_layers > 0 and not (cfg.masking.mim or cfg.masking.sync):
        raise ConfigError("model.mim_decoder_layers > 0 needs a masker for it: set masking.mim "
                          "(e.g. {type: random, mask_ratio: 0.5})")
    if cfg.masking.mim and cfg.model.mim_decoder_layers == 0:
        raise ConfigError("masking.mim is set but the model has no image decoder (model.mim_decoder_layers = 0)")
    if cfg.eval.classify_by not in ("label", "category", "subcategory"):
        raise ConfigError(f"eval.classify_by must be label, category or subcategory, got {cfg.eval.classify_by!r}")
    if cfg.data.sampler not in ("random", "grouped", "semi_hard"):
        raise ConfigError(f"data.sampler must be random, grouped or semi_hard, got {cfg.data.sampler!r}")
    d = cfg.data
    group_fields = ("category", "subcategory", "label", "item_id")
    if d.sampler == "grouped" and d.group_by not in group_fields:
        close = difflib.get_close_matches(str(d.group_by), group_fields, n=1)
        raise ConfigError(f"data.group_by must be one of {', '.join(group_fields)}, got {d.group_by!r}"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    if d.sampler == "semi_hard":
        if len(d.semi_hard_band) != 2 or not d.semi_hard_band[0] <= d.semi_hard_band[1]:
            raise ConfigError(f"data.semi_hard_band must be [low, high] with low <= high, got {d.semi_hard_band}")
        if d.refresh_embed not in ("image", "text"):
            raise ConfigError(f"data.refresh_embed must be image or text, got {d.refresh_embed!r}")
        if d.refresh_every < 0:
            raise ConfigError(f"data.refresh_every must be >= 0 (0 = only before step 1), got {d.refresh_every}")
    unknown = set(cfg.masking.sync) - {"words", "patches", "layer"}
    if unknown:
        raise ConfigError(f"masking.sync: unknown option(s) {sorted(unknown)}; valid: ['layer', 'patches', 'words']")
    if cfg.masking.sync:
        if cfg.model.arch != "fusion":
            raise ConfigError("masking.sync needs the fusion model's cross-attention: set model.arch: fusion")
        for k in ("words", "patches"):
            v = float(cfg.masking.sync.get(k, 0.15 if k == "words" else 0.25))
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"masking.sync.{k} must be in [0, 1), got {v}")
    if cfg.model.queue_size < 0 or (cfg.model.queue_size and not cfg.model.momentum):
        raise ConfigError(f"model.queue_size ({cfg.model.queue_size}) needs model.momentum > 0 "
                          f"(the queue holds the teacher's embeddings); 0 = no queue")
    if cfg.eval.retrieval_by not in ("image", "item"):
        raise ConfigError(f"eval.retrieval_by must be image or item, got {cfg.eval.retrieval_by!r}")
    if cfg.eval.vqa_beam_size < 1:
        raise ConfigError(f"eval.vqa_beam_size must be >= 1 (1 = greedy), got {cfg.eval.vqa_beam_size}")
    if cfg.eval.vqa_max_new_tokens < 1:
        raise ConfigError(f"eval.vqa_max_new_tokens must be >= 1, got {cfg.eval.vqa_max_new_tokens}")
    if cfg.eval.k_test < 0:
        raise ConfigError(f"eval.k_test must be >= 0 (0 = no ITM re-ranking), got {cfg.eval.k_test}")
    if not 0.0 < cfg.data.fraction <= 1.0:
        raise ConfigError(f"data.fraction must be in (0, 1], got {cfg.data.fraction}")
    _validate_streaming(cfg.data)
    _validate_mixing(cfg)
    _validate_capabilities(cfg)
    _validate_fusion_towers(cfg.model)


def teacher_readers(cfg) -> list[str]:
    """The settings that read the fusion arch's momentum teacher; empty: a teacher would be built, updated and
    run every step for nothing."""
    m, active = cfg.model, cfg.active_objectives()
    readers = {
        "objectives.itc.distill_alpha > 0": "itc" in active and float(active["itc"].get("distill_alpha", 0) or 0) > 0,
        "masking.sync": bool(cfg.masking.sync),
        "masking.relevance=attention": cfg.masking.relevance == "attention",
        "objectives.agreement": "agreement" in active,
        "model.mim_target=semantic": m.mim_target == "semantic",
    }
    return [name for name, reads in readers.items() if reads]


def _validate_capabilities(cfg) -> None:
    """Settings that only one model family reads: refused elsewhere rather than silently doing nothing."""
    m, active = cfg.model, cfg.active_objectives()
    if m.arch == "maccap":                      # _validate_maccap owns MacCap's rules
        return
    captions = m.arch == "coca" and m.decoder_layers > 0
    if "ic" in active and not captions:
        raise ConfigError("objectives.ic trains a caption decoder: it needs model.arch: coca with "
                          f"model.decoder_layers > 0 (this model: arch {m.arch}, decoder_layers {m.decoder_layers}; "
                          "the fusion arch has no caption decoder)")
    if cfg.masking.ic and not captions:
        raise ConfigError("masking.ic picks the patches the caption decoder reads: it needs model.arch: coca with "
                          "model.decoder_layers > 0")
    if m.momentum and m.arch != "fusion":
        raise ConfigError(f"model.momentum builds the fusion arch's EMA teacher; model.arch={m.arch} has none "
                          f"(set model.momentum=0)")
    distill = "itc" in active and float(cfg.objectives["itc"].get("distill_alpha", 0.0) or 0.0) > 0
    if distill and not m.momentum:
        raise ConfigError("objectives.itc.distill_alpha > 0 distils from the momentum teacher: it needs "
                          "model.arch: fusion with model.momentum > 0")
    for name in ("agreement", "itm", "mlm"):
        if name in active and m.arch != "fusion":
            raise ConfigError(f"objectives.{name} runs on the fusion model: it needs model.arch: fusion "
                              f"(this model: arch {m.arch})")
    if m.queue_size and not distill:
        raise ConfigError(f"model.queue_size ({m.queue_size}) queues the teacher's embeddings as ITC distillation "
                          f"targets: it needs objectives.itc.distill_alpha > 0 (or set model.queue_size=0)")
    if not m.mim_inject and m.arch != "fusion":
        raise ConfigError("model.mim_inject=false is the fusion arch's (SemMIM) switch; on model.arch=coca the "
                          "image decoder reads the text when model.mim_text=true")
    if cfg.masking.mlm and "mlm" not in active:
        raise ConfigError("masking.mlm masks words for objectives.mlm, which is not active: add it or remove "
                          "masking.mlm")
    if cfg.data.views == 2 and "agreement" not in active:
        raise ConfigError("data.views=2 builds a second view for objectives.agreement, which is not active: add "
                          "it or set data.views=1")


def _validate_fusion_towers(m) -> None:
    """Fusion-model settings it would otherwise ignore (after the objective checks: a recipe switched to the
    fusion arch hears first about the objectives it cannot train)."""
    if m.arch != "fusion":
        return
    if m.text_pool != "cls":
        raise ConfigError("model.text_pool: the fusion arch pools its [BOS] token (text_pool=cls)")
    if m.image_pool != "cls":
        raise ConfigError("model.image_pool: the fusion arch embeds its [CLS] token (image_pool=cls)")
    if m.fusion_layers < 1:
        raise ConfigError("model.fusion_layers must be >= 1 for the fusion arch: its ITM / MLM heads see the "
                          f"image only through them (got {m.fusion_layers})")


def _validate_streaming(d) -> None:
    if d.shard_split not in ("auto", True, False):
        raise ConfigError(f"data.shard_split must be auto, true or false, got {d.shard_split!r}")
    if d.epoch_batches < 0:
        raise ConfigError(f"data.epoch_batches must be >= 0, got {d.epoch_batches}")
    if d.resample and d.epoch_batches == 0:
        raise ConfigError("data.resample=true streams for ever: set data.epoch_batches (> 0), the number "
                          "of batches per rank that make one epoch")
    if d.epoch_batches and not d.resample:
        raise ConfigError("data.epoch_batches sets the epoch length of a resampled stream: it needs "
                          "data.resample=true (or leave it 0)")
    if d.resample and d.shard_split is False:
        raise ConfigError("data.resample=true draws shards per (rank, worker): it needs data.shard_split "
                          "auto or true")


def _validate_mixing(cfg) -> None:
    mx, active = cfg.mixer, cfg.active_objectives()
    if mx.type:
        from .mixing import MIXERS
        try:
            MIXERS.get(mx.type)
        except KeyError as e:
            raise ConfigError(f"mixer.type: {e.args[0]}") from None
        if "mixed_itc" not in active:
            raise ConfigError(f"mixer.type={mx.type} mixes images for the mixed ITC objective: add "
                              f"objectives.mixed_itc (e.g. objectives.mixed_itc.weight=1)")
        if len(mx.side) != 2 or not 0.0 < mx.side[0] <= mx.side[1] <= 1.0:
            raise ConfigError(f"mixer.side must be [low, high] with 0 < low <= high <= 1, got {mx.side}")
        if not 0.0 < mx.stop <= 1.0:
            raise ConfigError(f"mixer.stop must be in (0, 1], got {mx.stop}")
        if mx.alpha <= 0:
            raise ConfigError(f"mixer.alpha must be > 0, got {mx.alpha}")
    elif "mixed_itc" in active:
        raise ConfigError("objectives.mixed_itc needs mixed images: set mixer.type (timix, cutmix or mixup)")
    if mx.scores not in ("auto", "pta", "relevance"):
        raise ConfigError(f"mixer.scores must be auto, pta or relevance, got {mx.scores!r}")
    if (mx.scores == "pta" or "pta" in active) and not cfg.model.pta:
        raise ConfigError("the PTA scores / objectives.pta need the patch-text alignment head: set model.pta=true")
    if mx.type == "timix" and cfg.model.pta and mx.scores != "relevance" and "pta" not in active:
        raise ConfigError("mixer.type=timix would score patches with the PTA head (model.pta=true), but no "
                          "objective trains it: add objectives.pta (e.g. objectives.pta.weight=1), or score by "
                          "relevance (mixer.scores=relevance, or model.pta=false)")
    if cfg.model.pta_block < 0 or cfg.model.pta_block > cfg.model.vision_layers:
        raise ConfigError(f"model.pta_block must be in 0..{cfg.model.vision_layers} (0 = the middle block), "
                          f"got {cfg.model.pta_block}")
    if cfg.model.pta_width != 0 and cfg.model.pta_width < 4:
        raise ConfigError(f"model.pta_width must be 0 (= model.vision_width) or >= 4 (its MLP narrows to C/4), "
                          f"got {cfg.model.pta_width}")
    if mx.scores == "relevance" and cfg.masking.relevance == "attention" and cfg.model.arch != "fusion":
        raise ConfigError("mixer.scores=relevance with masking.relevance=attention needs model.arch: fusion")


def _validate_maccap(cfg) -> None:
    mc = cfg.maccap
    if cfg.model.arch != "maccap":
        if "prefix_lm" in cfg.active_objectives():
            raise ConfigError("objectives.prefix_lm trains a MacCap model: set model.arch: maccap")
        return
    if mc.noise_var != "auto" and (isinstance(mc.noise_var, bool) or not isinstance(mc.noise_var, (int, float))
                                   or mc.noise_var < 0):
        raise ConfigError(f"maccap.noise_var must be a number >= 0 or 'auto', got {mc.noise_var!r}")
    for key in ("copies", "queries", "samples", "adaptor_width", "adaptor_heads", "adaptor_layers"):
        if getattr(mc, key) < 1:
            raise ConfigError(f"maccap.{key} must be >= 1, got {getattr(mc, key)}")
    if mc.subregions < 0:
        raise ConfigError(f"maccap.subregions must be >= 0 (0 = the global feature only), got {mc.subregions}")
    if mc.adaptor_width % mc.adaptor_heads:
        raise ConfigError(f"maccap.adaptor_width ({mc.adaptor_width}) must be divisible by maccap.adaptor_heads "
                          f"({mc.adaptor_heads})")
    if not cfg.lm.path and cfg.lm.width % cfg.lm.heads:
        raise ConfigError(f"lm.width ({cfg.lm.width}) must be divisible by lm.heads ({cfg.lm.heads})")
    bad = sorted(set(cfg.active_objectives()) - {"prefix_lm"})
    if bad:
        raise ConfigError(f"a MacCap model trains only objectives.prefix_lm (text only); remove {bad}")
    if cfg.mixer.type or any(getattr(cfg.masking, r) for r in ("ic", "mim", "mlm", "sync")):
        raise ConfigError("MacCap trains on text only: no masking / mixing")


def _validate_towers(cfg) -> None:
    """Tower layer options (model.act, text_pool, image_pool, text_tower; finealign/interop/ sets them for imports)."""
    from .models.layers import ACTIVATIONS
    m = cfg.model
    if m.act not in ACTIVATIONS:
        raise ConfigError(f"model.act must be one of {', '.join(ACTIVATIONS)}, got {m.act!r}")
    if m.text_pool not in ("cls", "eos", "mean"):
        raise ConfigError(f"model.text_pool must be cls, eos or mean, got {m.text_pool!r}")
    if m.image_pool not in ("attn", "cls"):
        raise ConfigError(f"model.image_pool must be attn or cls, got {m.image_pool!r}")
    if m.text_mlp_ratio < 0:
        raise ConfigError(f"model.text_mlp_ratio must be >= 0 (0 = model.mlp_ratio), got {m.text_mlp_ratio}")
    if m.text_tower not in ("own", "hf"):
        raise ConfigError(f"model.text_tower must be own or hf, got {m.text_tower!r}")
    if m.text_tower == "hf":
        if m.arch == "fusion":
            raise ConfigError("model.text_tower=hf is for the dual encoder (model.arch: coca), not fusion")
        if m.decoder_layers > 0:
            raise ConfigError("model.text_tower=hf is a bidirectional encoder: it cannot feed a caption decoder; "
                              "set model.decoder_layers=0 (CLIP-style, e.g. the clip recipe)")


#: data sources generated in memory (no files: data.root does not apply, data.num_samples does)
PROCEDURAL_SOURCES = ("shapes", "shapes-items")
#: numeric keys and the smallest value each accepts (its meaning at the bound in the schema's comments)
AT_LEAST = {
    "data.batch_size": 1, "data.eval_batch_size": 1, "data.workers": 0, "data.num_samples": 0,
    "data.max_image_pixels": 0, "train.steps": 0, "train.grad_accum": 1, "train.warmup": 0,
    "train.log_every": 1, "train.ckpt_every": 0, "train.keep": 0, "train.eval_every": 0, "train.threads": 0,
    "train.skip_nonfinite": 0, "train.clip_grad": 0, "train.weight_decay": 0, "train.eps": 0,
    "eval.max_images": 0, "eval.beam_size": 1, "eval.max_new_tokens": 1, "tokenizer.vocab_size": 8,
    "model.image_size": 1, "model.patch_size": 1, "model.vision_width": 1, "model.vision_layers": 1,
    "model.vision_heads": 1, "model.text_width": 1, "model.text_layers": 0, "model.text_heads": 1,
    "model.decoder_layers": 0, "model.fusion_layers": 0, "model.context_length": 3, "model.embed_dim": 1,
    "model.caption_queries": 1, "model.queue_size": 0, "model.mim_decoder_layers": 0,
    "model.mim_decoder_width": 0, "model.mim_decoder_heads": 0, "model.vocab_size": 0,
    "maccap.copies": 1, "maccap.queries": 1, "maccap.subregions": 0, "maccap.samples": 1,
}
#: other numeric bounds: key -> (test, what it says)
IN_RANGE = {"train.lr": (lambda v: v > 0, "> 0"), "train.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
            "train.beta1": (lambda v: 0 <= v < 1, "in [0, 1)"), "train.beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "model.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"), "eval.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "eval.temperature": (lambda v: v > 0, "> 0")}


def get_key(cfg, dotted: str):
    """``get_key(cfg, "train.lr")``: a config value by its dotted key."""
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_ranges(cfg) -> None:
    for key, low in AT_LEAST.items():
        if get_key(cfg, key) < low:
            raise ConfigError(f"{key} must be >= {low}, got {get_key(cfg, key)}")
    for key, (ok, text) in IN_RANGE.items():
        if not ok(get_key(cfg, key)):
            raise ConfigError(f"{key} must be {text}, got {get_key(cfg, key)}")
    if cfg.data.num_samples and cfg.data.source not in PROCEDURAL_SOURCES:
        raise ConfigError(f"data.num_samples sizes a procedural source ({', '.join(PROCEDURAL_SOURCES)}); "
                          f"data.source={cfg.data.source} reads its samples from files: use data.fraction "
                          f"(training) or eval.max_images instead")
    from .config_schema import EVAL_TASKS
    for t in cfg.eval.tasks:
        if t not in EVAL_TASKS:
            close = difflib.get_close_matches(str(t), EVAL_TASKS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"eval.tasks: unknown task {t!r}{hint} (tasks: {', '.join(EVAL_TASKS)})")


def _check_options(name: str, cls, opts) -> None:
    """``objectives.NAME.KEY`` must be ``weight`` or a keyword of the objective's constructor."""
    import inspect
    if not isinstance(opts, dict):
        raise ConfigError(f"objectives.{name} must be a mapping of options (e.g. {{weight: 1.0}}), got {opts!r}")
    w = opts.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise ConfigError(f"objectives.{name}.weight must be a number, got {w!r}")
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = ["weight"] + [k for k, p in params.items()
                          if k != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in opts:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"objectives.{name}.{key}: unknown option{hint} ({name} takes: {', '.join(known)})")
