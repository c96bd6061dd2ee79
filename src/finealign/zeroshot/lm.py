"""Language models MacCap writes into, behind one small interface, and prefix-conditioned decoding.

``SmallCausalLM``: finealign's own pre-LN causal decoder (trained from scratch on the caption text,
sharing the backbone's BPE tokenizer). ``HFCausalLM``: any Hugging Face causal LM saved in a local
directory (``transformers``, optional extra ``finealign[hf]``), frozen unless ``lm.trainable``.

Interface: ``hidden_size``; ``embed(ids) (B, T) -> (B, T, D)``; ``logits(embeds (B, L, D), mask (B, L)
bool) -> (B, L, V)``; ``tokenize(captions) -> ids (B, T), mask (B, T), start`` where the first ``start``
tokens are given, not predicted (the own LM's BOS; 0 for GPT-2-style LMs, whose first token the last
prefix position predicts); ``decode(ids) -> str``; ``eos_id``, ``pad_id``.

``generate(lm, prefix, ...)`` decodes after a (B, P, D) prefix: greedy, beam search (length-normalised
log-probability) or top-p sampling, without a cache (captions are short; every step reruns the prefix).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models.generation import top_p_sample
from ..models.layers import Block, init_weights


class SmallCausalLM(nn.Module):
    def __init__(self, tokenizer, width: int = 256, layers: int = 4, heads: int = 4, max_len: int = 128,
                 context_length: int = 32):
        super().__init__()
        self.tokenizer, self.context_length = tokenizer, context_length
        self.hidden_size, self.max_len = width, max_len
        self.tok_embed = nn.Embedding(tokenizer.vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, width))
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)

    eos_id = property(lambda self: self.tokenizer.eos_id)
    pad_id = property(lambda self: self.tokenizer.pad_id)

    def embed(self, ids: Tensor) -> Tensor:
        return self.tok_embed(ids)

    def logits(self, embeds: Tensor, mask: Tensor) -> Tensor:
        """embeds (B, L, D), mask (B, L) True on real positions -> (B, L, V); causal, PAD keys hidden."""
        B, L, _ = embeds.shape
        if L > self.max_len:
            raise ValueError(f"sequence of {L} positions exceeds the LM's max_len {self.max_len}")
        x = embeds + self.pos_embed[:, :L]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        attn = (causal & mask.bool()[:, None, :]) | torch.eye(L, dtype=torch.bool, device=x.device)
        for blk in self.blocks:
            x = blk(x, mask=attn[:, None])
        return self.ln_f(x) @ self.tok_embed.weight.t()                       # (B, L, V) tied head

    def tokenize(self, captions):
        ids, mask = self.tokenizer.encode_batch(list(captions), self.context_length)
        return ids, mask, 1                                                   # BOS is given

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def prompt_ids(self, text: str) -> list[int]:
        """Given tokens of a prompt (BOS + its tokens, no EOS): generation continues after them."""
        return [self.tokenizer.bos_id] + self.tokenizer.tokenize([text])[0][: self.context_length - 2]


class HFCausalLM(nn.Module):
    """A local Hugging Face causal LM (``AutoModelForCausalLM`` + ``AutoTokenizer``, no download)."""

    def __init__(self, path: str | Path, trainable: bool = False, context_length: int = 32):
        super().__init__()
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:                                              # pragma: no cover
            raise ImportError("lm.path needs transformers: pip install 'finealign[hf]'") from e
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"lm.path {path}: no config.json (a saved Hugging Face causal LM "
                                    f"directory is expected; nothing is downloaded)")
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        self.hf_tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.context_length = context_length
        self.hidden_size = self.model.get_input_embeddings().embedding_dim
        self.eos_id = self.hf_tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"{path}: the tokenizer has no eos token")
        self.pad_id = self.hf_tokenizer.pad_token_id if self.hf_tokenizer.pad_token_id is not None else self.eos_id
        self.model.requires_grad_(trainable)
        self.trainable = trainable

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.model.eval()                                                 # frozen: no dropout either
        return self

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def logits(self, embeds: Tensor, mask: Tensor) -> Tensor:
        return self.model(inputs_embeds=embeds, attention_mask=mask.long()).logits

    def tokenize(self, captions):
        rows = [self.hf_tokenizer(c, add_special_tokens=False)["input_ids"][: self.context_length - 1]
                + [self.eos_id] for c in captions]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
        return ids, mask, 0

    def prompt_ids(self, text: str) -> list[int]:
        return self.hf_tokenizer(text, add_special_tokens=False)["input_ids"][: self.context_length - 1]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.hf_tokenizer.decode(ids, skip_special_tokens=True).strip()


def build_lm(lm_cfg, tokenizer, context_length: int, prefix_len: int) -> nn.Module:
    """``LMConfig`` -> the HF LM at ``lm.path`` or finealign's own (trainable) small LM."""
    if lm_cfg.path:
        return HFCausalLM(lm_cfg.path, trainable=lm_cfg.trainable, context_length=context_length)
    return SmallCausalLM(tokenizer, lm_cfg.width, lm_cfg.layers, lm_cfg.heads,
                         max_len=prefix_len + context_length + 32, context_length=context_length)


@torch.no_grad()
def generate(lm, prefix: Tensor, start: Tensor, strategy: str = "beam", max_new_tokens: int = 16,
             beam_size: int = 4, top_p: float = 0.9, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """prefix (B, P, D), start (B, s) given tokens -> per row the generated token ids (EOS excluded)."""
    if strategy == "beam":
        return [_beam(lm, prefix[i:i + 1], start[i:i + 1], max_new_tokens, beam_size) for i in range(len(prefix))]
    if strategy not in ("greedy", "top_p"):
        raise ValueError(f"decode strategy must be greedy, beam or top_p, got {strategy!r}")
    B = prefix.shape[0]
    seq = start.clone()
    done = torch.zeros(B, dtype=torch.bool, device=prefix.device)
    out: list[list[int]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        logp = _next_logp(lm, prefix, seq)                                     # (B, V)
        if strategy == "greedy":
            nxt = logp.argmax(-1)
        else:
            nxt = top_p_sample(logp, top_p, temperature, generator)
        for i in range(B):
            if not done[i]:
                if int(nxt[i]) == lm.eos_id:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    return out


def _next_logp(lm, prefix: Tensor, seq: Tensor) -> Tensor:
    emb = torch.cat([prefix, lm.embed(seq).to(prefix.dtype)], dim=1)          # (B, P+s, D)
    mask = torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
    return F.log_softmax(lm.logits(emb, mask)[:, -1].float(), dim=-1)         # (B, V)


def _beam(lm, prefix: Tensor, start: Tensor, max_new_tokens: int, beam_size: int) -> list[int]:
    """Beam search for one row; finished hypotheses ranked by mean token log-probability."""
    beams = [(0.0, [])]                                                        # (sum logp, tokens)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_new_tokens):
        seqs = torch.stack([torch.cat([start[0], torch.tensor(t, dtype=torch.long, device=start.device)])
                            for _, t in beams])                               # (K, s+t)
        logp = _next_logp(lm, prefix.expand(len(beams), -1, -1), seqs)       # (K, V)
        cand = []
        for (score, toks), row in zip(beams, logp):
            top = row.topk(beam_size)
            cand += [(score + float(v), toks + [int(i)]) for v, i in zip(top.values, top.indices)]
        cand.sort(key=lambda c: c[0], reverse=True)
        beams = []
        for score, toks in cand:
            if toks[-1] == lm.eos_id:
                finished.append((score / len(toks), toks[:-1]))
            else:
                beams.append((score, toks))
            if len(beams) == beam_size:
                break
        if not beams or len(finished) >= beam_size:
            break
    finished += [(s / max(len(t), 1), t) for s, t in beams]
    return max(finished, key=lambda c: c[0])[1]
