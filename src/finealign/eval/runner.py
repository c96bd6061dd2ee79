"""Evaluate a model on a split: retrieval, captioning, zero-shot classification, TGIR and VQA.

Every task embeds / captions each *unique image* once; several captions per image count as several
references (captioning) or several positives (retrieval). Fusion models (with an ``itm_head``) re-rank
each retrieval query's ITC top ``eval.k_test`` with the ITM head (see :mod:`.rerank`): the re-ranked
recalls are the main numbers, the ITC-only ones are kept with an ``itc_`` prefix. ``tgir`` (text-guided
image retrieval, see :mod:`.tgir`) uses its own gallery and queries from the data source; so does
``vqa`` (zero-shot VQA on the ``shapes`` scenes, models with ``answer()``, see :mod:`.vqa`).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data.loader import build_source, collect_captions, iter_eval_images
from ..data.skips import SkipLog
from ..data.transforms import ImageTransform
from .captioning import score_captions
from .classification import build_class_embeddings, zero_shot_classify
from .rerank import ITMScorer, can_rerank, itm_rerank_metrics
from .retrieval import retrieval_metrics
from .tgir import evaluate_tgir
from .vqa import can_answer, evaluate_vqa

log = logging.getLogger("finealign")
TASKS = ("retrieval", "caption", "classify", "tgir", "vqa")
IMAGE_TASKS = ("retrieval", "caption", "classify")     # tasks on the split's images and captions


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], context_length: int, device, batch_size: int = 256,
                scorer: ITMScorer | None = None):
    """(T, E) float text embeddings; with ``scorer``, also hands it the token features (T, L, Dt)."""
    out, tokens, masks = [], [], []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenizer.encode_batch(list(texts[i:i + batch_size]), context_length)
        enc = model.encode_text(ids.to(device), mask.to(device))
        out.append(enc["embed"].float())
        if scorer is not None:
            tokens.append(enc["tokens"])
            masks.append(mask.to(device))
    if scorer is not None and tokens:
        scorer.set_texts(torch.cat(tokens), torch.cat(masks))
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim, device=device)


@torch.no_grad()
def evaluate(model, tokenizer, cfg: Config, split: str | None = None, tasks: Sequence[str] | None = None,
             device: torch.device | str = "cpu", progress: bool = True, samples=None) -> dict:
    """Returns ``{"retrieval": {...}, "caption": {...}, "classify": {...}, "tgir": {...}, "vqa": {...},
    "samples": [...], "skipped": {...}}`` (``num_images`` when an image task ran)."""
    tasks = list(tasks or cfg.eval.tasks)
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
    device = torch.device(device)
    was_training = model.training
    model.eval()
    skips = SkipLog(strict=cfg.data.strict)
    results: dict = {}
    try:
        if any(t in IMAGE_TASKS for t in tasks) or asked_none:
            results.update(_image_tasks(model, tokenizer, cfg, split, tasks, device, progress, samples, skips))
        if "tgir" in tasks:
            results["tgir"] = evaluate_tgir(
                model, cfg, split or cfg.data.test, device=device, progress=progress,
                embed_text=lambda t: embed_texts(model, tokenizer, t, cfg.model.context_length, device,
                                                 cfg.data.eval_batch_size), skips=skips)
        if "vqa" in tasks:
            results["vqa"] = evaluate_vqa(model, cfg, split or cfg.data.test, device=device,
                                          max_images=cfg.eval.max_images, progress=progress)
    finally:
        model.train(was_training)
    results["skipped"] = skips.to_dict()
    return results


def _image_tasks(model, tokenizer, cfg: Config, split, tasks, device, progress, samples, skips) -> dict:
    """Retrieval, captioning and classification on the split's unique images."""
    if samples is None:
        samples = build_source(cfg.data, split or cfg.data.test, skips)
    if cfg.eval.max_images:
        samples = [s for _, s in zip(range(cfg.eval.max_images), samples)]
    transform = ImageTransform(cfg.model.image_size, train=False)

    scorer = None
    if "retrieval" in tasks and cfg.eval.k_test > 0 and can_rerank(model):
        scorer = ITMScorer(model)
    image_embeds, kept, generated = [], [], []
    bar = tqdm(desc="eval", disable=not progress, unit="img", dynamic_ncols=True)
    for images, batch_samples in iter_eval_images(samples, transform, cfg.data.eval_batch_size,
                                                  cfg.data.workers, skips):
        images = images.to(device)
        enc = model.encode_image(images)
        image_embeds.append(enc["embed"].float())
        if scorer is not None:
            scorer.add_images(enc)
        kept.extend(batch_samples)
        if "caption" in tasks:
            ids = model.generate(images, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
                                 strategy=cfg.eval.decode, max_new_tokens=cfg.eval.max_new_tokens,
                                 beam_size=cfg.eval.beam_size, top_p=cfg.eval.top_p,
                                 temperature=cfg.eval.temperature)
            generated.extend(tokenizer.decode(row.tolist()) for row in ids)
        bar.update(len(batch_samples))
    bar.close()
    if not kept:
        raise ValueError(f"no evaluable images in split {split or cfg.data.test!r} of {cfg.data.root}: "
                         f"{skips.summary()}")
    img = torch.cat(image_embeds)
    results: dict = {"num_images": len(kept)}
    if "retrieval" in tasks:
        texts, text_to_image = collect_captions(kept)
        txt = embed_texts(model, tokenizer, texts, cfg.model.context_length, device, cfg.data.eval_batch_size,
                          scorer=scorer)
        groups = None
        if cfg.eval.retrieval_by == "item":     # several views of one item share its description
            groups = torch.tensor([s.item_id if s.item_id >= 0 else -(i + 1) for i, s in enumerate(kept)],
                                  device=device)
        if scorer is not None:
            results["retrieval"] = itm_rerank_metrics(img, txt, text_to_image.to(device), cfg.eval.k_test,
                                                      scorer, batch_size=cfg.data.eval_batch_size,
                                                      progress=progress, image_groups=groups)
        else:
            results["retrieval"] = retrieval_metrics(img, txt, text_to_image.to(device), image_groups=groups)
        results["retrieval"]["by"] = cfg.eval.retrieval_by
        results["retrieval"]["num_texts"] = len(texts)
    if "caption" in tasks:
        refs = {i: s.captions for i, s in enumerate(kept)}
        preds = {i: c for i, c in enumerate(generated)}
        results["caption"] = score_captions(refs, preds)
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
            cls_emb = build_class_embeddings(
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
