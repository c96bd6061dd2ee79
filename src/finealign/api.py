"""Loading trained models: ``finealign.load(path)`` -> model, tokenizer and resolved config."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, from_dict
from .models.factory import build_model
from .train import checkpoint as ckpt


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    config: Config
    path: Path


def load(path: str | Path, device: str | torch.device = "cpu", which: str = "latest") -> Loaded:
    """Load a checkpoint directory, or the latest valid checkpoint of a run directory."""
    from .data.tokenizer import Tokenizer
    ck = ckpt.find_checkpoint(path, which)
    state = ckpt.load_checkpoint(ck)            # verifies the files once; config and extra, no weights
    cfg = from_dict(state["config"])
    tok_json = (state.get("extra") or {}).get("tokenizer_json")
    if not tok_json:
        raise ckpt.CheckpointError(f"{ck}: checkpoint carries no tokenizer")
    tokenizer = Tokenizer.from_str(tok_json)
    model = build_model(cfg.model, tokenizer.vocab_size, full=cfg, tokenizer=tokenizer)
    ckpt.load_weights(model, ck)
    model.to(device).eval()
    return Loaded(model=model, tokenizer=tokenizer, config=cfg, path=ck)
