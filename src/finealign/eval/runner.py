"""Evaluate a model on a split: retrieval, captioning, zero-shot classification, TGIR and VQA.

Every task embeds / captions each *unique image* once; several captions per image count as several
references (captioning) or several positives (retrieval). Fusion models (with an ``itm_head``) re-rank
each retrieval query's ITC top ``eval.k_test`` with the ITM head (see :mod:`.rerank`): the re-ranked
recalls are the main numbers, the ITC-only ones are kept with an ``itc_`` prefix. ``tgir`` (text-guided
image retrieval, see :mod:`.tgir`) uses its own gallery and queries from the data source; so does
``vqa`` (zero-shot VQA on the ``shapes`` scenes, models with ``answer()``, see :mod:`.vqa`).

Under torch.distributed (torchrun, ``world_size > 1``) :func:`evaluate` is a collective: the unique images
(and the retrieval texts, the ITM pairs, the TGIR gallery and its queries' texts) are shared out by rank
in whole eval batches and gathered back in order (:mod:`.shard`), captions are scored once on rank 0;
every rank returns exactly the single-process results. VQA is not split (every rank answers every
question: the same results, redundantly).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from ..config import Config
from ..config_schema import EVAL_TASKS
from ..data.loader import build_source, collect_captions, unique_images
from ..data.skips import SkipLog
from ..data.transforms import ImageTransform
from .captioning import score_captions
from .classification import build_class_embeddings, zero_shot_classify
from .rerank import ITMScorer, can_rerank, itm_rerank_metrics
from .retrieval import retrieval_metrics
from .shard import Sharding, image_pass
from .tgir import evaluate_tgir
from .vqa import can_answer, evaluate_vqa

log = logging.getLogger("finealign")
TASKS = EVAL_TASKS
IMAGE_TASKS = ("retrieval", "caption", "classify")     # tasks on the split's images and captions


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], context_length: int, device, batch_size: int = 256,
                scorer: ITMScorer | None = None, shard: Sharding | None = None):
    """(T, E) float text embeddings; with ``scorer``, also hands it the token features (T, L, Dt).

    With an enabled ``shard`` (a collective), each rank embeds a contiguous run of whole batches and
    every rank gets all T rows (and the scorer all T texts)."""
    shard = shard or Sharding()
    lo, hi = shard.bounds(len(texts), batch_size)
    out, tokens, masks = [], [], []
    for i in range(lo, hi, batch_size):
        ids, mask = tokenizer.encode_batch(list(texts[i:min(i + batch_size, hi)]), context_length)
        enc = model.encode_text(ids.to(device), mask.to(device))
        out.append(enc["embed"].float())
        if scorer is not None:
            tokens.append(enc["tokens"])
            masks.append(mask.to(device))
    embed = shard.gather_rows(torch.cat(out) if out else None)
    if scorer is not None:
        tok = shard.gather_rows(torch.cat(tokens) if tokens else None)
        mask = shard.gather_rows(torch.cat(masks) if masks else None)
        if tok is not None:
            scorer.set_texts(tok, mask)
    return embed if embed is not None else torch.zeros(0, model.embed_dim, device=device)


@torch.no_grad()
def evaluate(model, tokenizer, cfg: Config, split: str | None = None, tasks: Sequence[str] | None = None,
             device: torch.device | str = "cpu", progress: bool = True, samples=None,
             distributed: bool | None = None) -> dict:
    """Returns ``{"retrieval": {...}, "caption": {...}, "classify": {...}, "tgir": {...}, "vqa": {...},
    "samples": [...], "skipped": {...}}`` (``num_images`` when an image task ran).

    Under torch.distributed (``world_size > 1``; ``distributed=False`` opts out) this is a collective:
    call it on every rank with the same arguments. Images and texts are split over the ranks (see
    :mod:`.shard`) and every rank returns the same results as a single-process run; progress bars show
    on rank 0 only."""
    shard = Sharding.current(distributed)
    progress = progress and shard.is_main
    tasks = [tasks] if isinstance(tasks, str) else list(tasks or cfg.eval.tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown eval task {t!r}; choose from {', '.join(TASKS)}")
    asked_none = not tasks
    if "caption" in tasks and getattr(model, "decoder", None) is None:
        log.warning("model has no caption decoder (decoder_layers=0): skipping the caption task")
        tasks.remove("caption")
    if "vqa" in tasks and not can_answer(model):
        log.warning("model has no answer() method (only MacCap models answer questions): skipping the vqa task")
        tasks.remove("vqa")
    text_tasks = [t for t in (IMAGE_TASKS if asked_none else tasks) if t != "vqa"]
    if tokenizer is None and text_tasks:
        raise ValueError(f"eval tasks {', '.join(text_tasks)} read text, but the model came without a tokenizer "
                         "(a Hugging Face CLIP directory needs its tokenizer.json beside config.json)")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    skips = SkipLog(strict=cfg.data.strict)
    results: dict = {}
    try:
        if any(t in IMAGE_TASKS for t in tasks) or asked_none:
            results.update(_image_tasks(model, tokenizer, cfg, split, tasks, device, progress, samples, skips,
                                        shard))
        if "tgir" in tasks:
            results["tgir"] = evaluate_tgir(
                model, cfg, split or cfg.data.test, device=device, progress=progress,
                embed_text=lambda t: embed_texts(model, tokenizer, t, cfg.model.context_length, device,
                                                 cfg.data.eval_batch_size, shard=shard), skips=skips, shard=shard)
        if "vqa" in tasks:       # not split: every rank answers every question (same results, redundant)
            results["vqa"] = evaluate_vqa(model, cfg, split or cfg.data.test, device=device,
                                          max_images=cfg.eval.max_images, progress=progress)
    finally:
        model.train(was_training)
    results["skipped"] = skips.to_dict()
    return results


def _image_tasks(model, tokenizer, cfg: Config, split, tasks, device, progress, samples, skips,
                 shard: Sharding) -> dict:
    """Retrieval, captioning and classification on the split's unique images."""
    if samples is None:
        samples = build_source(cfg.data, split or cfg.data.test, skips)
    if cfg.eval.max_images:
        samples = [s for _, s in zip(range(cfg.eval.max_images), samples)]
    uniq = unique_images(samples)                # the same ordered list on every rank
    transform = ImageTransform(cfg.model.image_size, train=False)
    bs = cfg.data.eval_batch_size

    scorer = None
    if "retrieval" in tasks and cfg.eval.k_test > 0 and can_rerank(model):
        scorer = ITMScorer(model)

    def step(images, batch_index):
        images = images.to(device)
        enc = model.encode_image(images)
        out = {"embed": enc["embed"].float()}
        if scorer is not None:
            out["itm"] = ITMScorer.image_features(enc)
        if "caption" in tasks:
            extra = {}
            if cfg.eval.decode == "top_p" and device.type == "cpu":    # the same samples however split
                extra["generator"] = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + batch_index)
            ids = model.generate(images, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                                 **cfg.eval.decoding(), **extra)
            out["caption"] = [tokenizer.decode(row.tolist()) for row in ids]
        return out

    run = image_pass(uniq, transform, bs, cfg.data.workers, skips, step, shard, progress, "eval")
    kept = [uniq[i] for i in run.kept]
    if not kept:
        raise ValueError(f"no evaluable images in split {split or cfg.data.test!r} of {cfg.data.root}: "
                         f"{skips.summary()}")
    img = run.tensors["embed"]
    if scorer is not None:
        scorer.set_images(run.tensors["itm"])
    generated = run.lists.get("caption", [])
    results: dict = {"num_images": len(kept)}
    if "retrieval" in tasks:
        texts, text_to_image = collect_captions(kept)
        txt = embed_texts(model, tokenizer, texts, cfg.model.context_length, device, bs, scorer=scorer,
                          shard=shard)
        groups = None
        if cfg.eval.retrieval_by == "item":     # several views of one item share its description
            groups = torch.tensor([s.item_id if s.item_id >= 0 else -(i + 1) for i, s in enumerate(kept)],
                                  device=device)
        if scorer is not None:
            results["retrieval"] = itm_rerank_metrics(img, txt, text_to_image.to(device), cfg.eval.k_test,
                                                      scorer, batch_size=bs, progress=progress,
                                                      image_groups=groups, shard=shard)
        else:
            results["retrieval"] = retrieval_metrics(img, txt, text_to_image.to(device), image_groups=groups)
        results["retrieval"]["by"] = cfg.eval.retrieval_by
        results["retrieval"]["num_texts"] = len(texts)
    if "caption" in tasks:
        refs = {i: s.captions for i, s in enumerate(kept)}
        preds = {i: c for i, c in enumerate(generated)}
        results["caption"] = shard.on_main(lambda: score_captions(refs, preds))   # Java scorers: once
        spread = sorted({round(i * (len(kept) - 1) / 19) for i in range(20)}) if len(kept) > 1 else [0]
        results["samples"] = [{"key": kept[i].key, "references": kept[i].captions, "generated": generated[i]}
                              for i in spread]
    if "classify" in tasks:
        field = cfg.eval.classify_by
        labels = [getattr(s, field) for s in kept]
        if any(l is None for l in labels):
            log.warning("classify: some samples have no %s; skipping the task", field)
        else:
            classes = sorted(set(labels))
            index = {c: i for i, c in enumerate(classes)}
            cls_emb = build_class_embeddings(   # every rank embeds the (few) prompts itself
                lambda t: embed_texts(model, tokenizer, t, cfg.model.context_length, device),
                classes, cfg.eval.templates)
            results["classify"] = zero_shot_classify(img, cls_emb, torch.tensor([index[l] for l in labels],
                                                                               device=device))
            results["classify"]["num_classes"] = len(classes)
            results["classify"]["by"] = field
    return results


def format_results(results: dict) -> str:
    """A plain-text table of the numeric results."""
    lines = []
    for task in TASKS:
        if task not in results:
            continue
        lines.append(f"{task}")
        for k, v in results[task].items():
            if isinstance(v, float):
                lines.append(f"  {k:<16} {v:8.2f}")
            elif isinstance(v, int):
                lines.append(f"  {k:<16} {v:8d}")
            elif v is None:
                lines.append(f"  {k:<16} {'n/a':>8}")
            elif task == "vqa" and isinstance(v, dict):
                lines.append(f"  {k:<16} " + "  ".join(f"{a} {b:.2f}" if isinstance(b, float) else f"{a} {b}"
                                                       for a, b in v.items()))
        for note in results[task].get("notes", []):
            lines.append(f"  note: {note}")
    return "\n".join(lines)
