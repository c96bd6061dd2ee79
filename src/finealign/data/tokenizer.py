"""Caption tokenizer: a thin wrapper around a HuggingFace ``tokenizers.Tokenizer``.

* ``Tokenizer.train(texts, vocab_size, lowercase)`` trains a byte-level BPE with the special
  tokens ``<pad>`` (id 0), ``<bos>``, ``<eos>``, ``<unk>``, ``<mask>`` (masked language modelling).
* ``Tokenizer.load(path)`` reads any ``tokenizer.json`` and finds pad/bos/eos among common names.
* ``encode_batch(texts, T)`` -> ``(ids (B, T) long, mask (B, T) bool)`` laid out as
  ``[BOS, tok..., EOS, PAD...]``; on truncation the EOS stays as the last real token.
* ``decode(ids)`` stops at EOS, drops special tokens and cleans whitespace.

Lower-casing (and whitespace cleanup) lives in the tokenizer's *normalizer*, so it is saved with
the tokenizer and raw text is always encoded consistently.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from torch import Tensor

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")
MASK_NAMES = ("<mask>", "[MASK]", "<unk>", "[UNK]")

# candidate names, most specific first
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>")
BOS_NAMES = ("<bos>", "<s>", "[CLS]", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("<eos>", "</s>", "[SEP]", "<|endoftext|>")


class Tokenizer:
    """Caption tokenizer with fixed-length batch encoding. Build it with ``train`` or ``load``."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>"):
        # finealign lays rows out itself ([BOS, tokens, EOS, PAD...], cut to the context): a tokenizer.json that
        # pads or truncates on its own (sentence-transformers' "Fixed 128") would break that layout
        hf.no_padding()
        hf.no_truncation()
        self.hf = hf
        self.source = source
        self._pad = self._find(PAD_NAMES, "pad")
        self._bos = self._find(BOS_NAMES, "bos")
        self._eos = self._find(EOS_NAMES, "eos")
        self._special = {self._pad, self._bos, self._eos}
        for tok in hf.get_added_tokens_decoder().values() if hasattr(hf, "get_added_tokens_decoder") else []:
            if tok.special:
                tid = hf.token_to_id(tok.content)
                if tid is not None:
                    self._special.add(tid)

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True,
              min_frequency: int = 1) -> "Tokenizer":
        """Train a byte-level BPE on ``texts``. Specials: <pad>=0, <bos>=1, <eos>=2, <unk>=3, <mask>=4.

        The vocabulary always contains the 256 byte symbols, so the effective size is at least
        260 even if ``vocab_size`` is smaller; it may also be smaller than ``vocab_size`` when the
        corpus runs out of merges.
        """
        hf = HFTokenizer(models.BPE(unk_token="<unk>"))
        hf.normalizer = _normalizer(lowercase)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=int(vocab_size),
            min_frequency=int(min_frequency),
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator((t for t in texts if t), trainer=trainer)
        return cls(hf, source="<trained>")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load any HF ``tokenizer.json`` (pad/bos/eos are looked up by their usual names)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        return cls(hf, source=str(path))

    @classmethod
    def from_str(cls, text: str) -> "Tokenizer":
        """Rebuild from ``to_str()`` output (e.g. the copy stored in a checkpoint)."""
        return cls(HFTokenizer.from_str(text), source="<string>")

    def to_str(self) -> str:
        """The tokenizer as a ``tokenizer.json`` string."""
        return self.hf.to_str()

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (normalizer, i.e. lower-casing, included)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))

    def _find(self, names: Sequence[str], what: str) -> int:
        for n in names:
            tid = self.hf.token_to_id(n)
            if tid is not None:
                return int(tid)
        raise ValueError(f"tokenizer {self.source}: no {what} token found "
                         f"(looked for {', '.join(names)})")

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def mask_id(self) -> int:
        """Id used to mask words (MLM): <mask>/[MASK], else the unknown token."""
        for name in MASK_NAMES:
            tid = self.hf.token_to_id(name)
            if tid is not None:
                return int(tid)
        raise ValueError(f"tokenizer {self.source} has no mask or unknown token for masked language modelling")

    @property
    def special_ids(self) -> list[int]:
        return sorted(self._special)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, bos={self.bos_id}, "
                f"eos={self.eos_id}, source={self.source!r})")

    # ------------------------------------------------------------------ encode / decode

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Raw token ids without specials (normalizer applied)."""
        encs = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def encode_batch(self, texts: Sequence[str], context_length: int) -> tuple[Tensor, Tensor]:
        """Texts -> ``(ids (B, T) long, mask (B, T) bool)`` with T = ``context_length``.

        Each row is ``[BOS, tok_1, ..., tok_k, EOS, PAD, ...]``; captions longer than T-2 tokens
        are cut so that EOS is still the last real token. ``mask`` is True on BOS..EOS.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (BOS + EOS), got {context_length}")
        T = int(context_length)
        ids = torch.full((len(texts), T), self.pad_id, dtype=torch.long)        # (B, T)
        mask = torch.zeros((len(texts), T), dtype=torch.bool)                   # (B, T)
        if not texts:
            return ids, mask
        for i, toks in enumerate(self.tokenize(texts)):
            row = [self.bos_id] + toks[: T - 2] + [self.eos_id]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def encode(self, text: str, context_length: int) -> tuple[Tensor, Tensor]:
        """Single text -> ``(ids (T,), mask (T,))``."""
        ids, mask = self.encode_batch([text], context_length)
        return ids[0], mask[0]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Token ids -> text. A leading BOS is dropped, decoding stops at the first EOS, other
        special tokens are skipped and whitespace is collapsed."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        seq = [int(i) for i in ids]
        if seq and seq[0] == self.bos_id:
            seq = seq[1:]
        if self.eos_id in seq:
            seq = seq[: seq.index(self.eos_id)]
        seq = [i for i in seq if i not in self._special and 0 <= i < self.vocab_size]
        text = self.hf.decode(seq, skip_special_tokens=True)
        return " ".join(text.split())

    def decode_batch(self, ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """(B, T) ids -> B strings."""
        return [self.decode(row) for row in ids]


def _normalizer(lowercase: bool):
    """NFKC, whitespace collapse + strip, optional lower-casing."""
    steps = [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)
