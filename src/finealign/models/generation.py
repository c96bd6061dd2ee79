"""Caption decoding for ``ContrastiveCaptioner``: greedy, beam search, nucleus (top-p) sampling.

Every strategy runs batched and calls a ``Stepper`` for the next-token logits of each row. With
``use_cache`` the stepper feeds only the newest token through the text encoder and decoder, reusing
KV caches; without it, it recomputes the whole prefix (the reference path the cached one must match).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layers import KVCache, reorder_caches


class Stepper:
    """Next-token logits (N, V) for rows ``seqs`` (N, L), given the image memory (N / group, M, D):
    rows r*group .. r*group + group-1 share memory row r (beam search: the beams of one image)."""

    def __init__(self, model, memory: Tensor, use_cache: bool, group: int = 1):
        self.model, self.use_cache, self.group = model, use_cache, group
        self.cached = 0                                                      # positions held in the caches
        if use_cache:
            # the memory stays (B, M, D): its cross-attention keys/values are computed once per image,
            # and each image's beams attend to them as a group (models/layers.py, Attention)
            self.memory = memory
            self.text_cache = model.text.new_cache()
            self.dec_cache = model.decoder.new_cache()
            _reserve([self.text_cache, self.dec_cache["self"]], model.text.context_length)
        else:
            self.memory = memory.repeat_interleave(group, dim=0) if group > 1 else memory  # (N, M, D)

    def __call__(self, seqs: Tensor) -> Tensor:
        m = self.model
        if self.use_cache:
            start, self.cached = self.cached, seqs.shape[1]
            new = seqs[:, start:]                                            # (N, t) not yet cached
            tokens = m.text.forward_step(new, self.text_cache, start)        # (N, t, D)
            logits = m.decoder.forward_step(tokens, self.memory, self.dec_cache, start)
        else:
            tokens = m.text.encode_tokens(seqs)                              # (N, L, D)
            logits = m.decoder(tokens, self.memory)                          # (N, L, V)
        return logits[:, -1].float()                                         # (N, V)

    def reorder(self, rows: Tensor) -> None:
        """Rows follow their beam of origin. Origins stay within one image, so the memory and the
        cross-attention caches (one per image) need no reordering."""
        if self.use_cache:
            reorder_caches(self.text_cache, rows)
            reorder_caches(self.dec_cache["self"], rows)


def _reserve(caches, capacity: int) -> None:
    """Preallocate self-attention caches for ``capacity`` positions (no regrowth while decoding)."""
    if isinstance(caches, KVCache):
        caches.capacity = max(caches.capacity, capacity)
    else:
        for c in caches:
            _reserve(c, capacity)


def _ban(logits: Tensor, ids: list[int]) -> Tensor:
    """Live rows may not emit BOS / PAD (unless PAD doubles as EOS)."""
    if ids:
        logits[:, ids] = float("-inf")
    return logits


def top_p_sample(logits: Tensor, top_p: float, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """Nucleus sampling, one token per row of ``logits`` (N, V) (log-probabilities work alike): the
    distribution ``softmax(logits / temperature)`` cut to the smallest set of most likely tokens whose
    mass reaches ``top_p`` (the top token always stays), renormalised. The draw runs where ``generator``
    lives. Shared by the CoCa decoder and MacCap's language model."""
    probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)   # (N, V)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    cum = sorted_p.cumsum(dim=-1)
    drop = cum - sorted_p >= top_p                                           # the tokens before already reach p
    drop[:, 0] = False                                                       # the top token always stays
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    where = generator.device if generator is not None else sorted_p.device
    pick = torch.multinomial(sorted_p.to(where), 1, generator=generator)     # (N, 1) index into sorted
    return order.gather(1, pick.to(order.device)).squeeze(1)                 # (N,)


def _sample_loop(step: Stepper, B: int, bos: int, eos: int, pad: int, max_new: int, banned: list[int],
                 pick) -> Tensor:
    device = step.memory.device
    seqs = torch.full((B, 1), bos, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new):
        nxt = pick(_ban(step(seqs), banned))                                 # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        done |= nxt == eos
        if done.all():
            break
    return seqs


def _beam_search(step: Stepper, B: int, K: int, bos: int, eos: int, pad: int, max_new: int,
                 banned: list[int]) -> Tensor:
    """Beam search over B*K rows; candidates ranked by length-normalised log-prob (sum / #generated).
    Finished beams carry PAD at no cost, keeping their score, until all K beams of every image finish."""
    device = step.memory.device
    N = B * K
    seqs = torch.full((N, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")                                            # first step: expand beam 0 only
    scores = scores.view(N)
    lengths = torch.zeros(N, device=device)                                  # generated tokens incl. EOS
    finished = torch.zeros(N, dtype=torch.bool, device=device)
    base = torch.arange(B, device=device)[:, None] * K                       # (B, 1) first row of each image
    for _ in range(max_new):
        logp = _ban(step(seqs), banned).log_softmax(dim=-1)                  # (N, V)
        V = logp.shape[1]
        carry = torch.full((V,), float("-inf"), device=device)
        carry[pad] = 0.0
        logp = torch.where(finished[:, None], carry, logp)                   # finished rows: PAD, free
        cand = scores[:, None] + logp                                        # (N, V) summed log-prob
        cand_len = (lengths + (~finished).float())[:, None]                  # (N, 1)
        norm = (cand / cand_len.clamp(min=1.0)).view(B, K * V)
        _, idx = norm.topk(K, dim=1)                                         # (B, K)
        origin, token = idx // V, idx % V                                    # beam of origin, new token
        rows = (base + origin).view(N)                                       # (N,) global source rows
        token = token.view(N)
        scores = cand.view(B, K * V).gather(1, idx).view(N)
        lengths = cand_len.view(N)[rows]
        finished = finished[rows] | (token == eos)
        seqs = torch.cat([seqs[rows], token[:, None]], dim=1)
        step.reorder(rows)
        if finished.all():
            break
    best = (scores / lengths.clamp(min=1.0)).view(B, K).argmax(dim=1)       # (B,)
    return seqs.view(B, K, -1)[torch.arange(B, device=device), best]       # (B, L)


@torch.no_grad()
def generate(model, images: Tensor, bos_id: int, eos_id: int, pad_id: int, strategy: str = "greedy",
             max_new_tokens: int = 20, beam_size: int = 3, top_p: float = 0.9, temperature: float = 1.0,
             use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """images (B, 3, H, W) -> LongTensor (B, L): BOS, tokens, EOS, then PAD (L <= 1 + max_new_tokens)."""
    if model.decoder is None:
        raise RuntimeError("generate() needs a caption decoder (model.decoder_layers > 0)")
    max_new = min(max_new_tokens, model.text.context_length - 1)
    memory = model.encode_image(images)["memory"]                            # (B, Q, D)
    B = memory.shape[0]
    banned = sorted({bos_id, pad_id} - {eos_id})
    if strategy == "greedy":
        return _sample_loop(Stepper(model, memory, use_cache), B, bos_id, eos_id, pad_id, max_new, banned,
                            lambda logits: logits.argmax(dim=-1))
    if strategy == "top_p":
        return _sample_loop(Stepper(model, memory, use_cache), B, bos_id, eos_id, pad_id, max_new, banned,
                            lambda logits: top_p_sample(logits, top_p, temperature, generator))
    if strategy == "beam":                                                   # B*K rows, image b -> rows b*K..
        return _beam_search(Stepper(model, memory, use_cache, group=beam_size), B, beam_size, bos_id, eos_id,
                            pad_id, max_new, banned)
    raise ValueError(f"unknown decoding strategy {strategy!r} (greedy | beam | top_p)")
