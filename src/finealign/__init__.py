"""finealign: fine-grained vision-language alignment (CLIP, CoCa, SyCoCa, SemMIM, SyncMask, MacCap, TiMix)."""
__version__ = "0.1.0"


def load(path, device="cpu", which="latest"):
    """Load a trained checkpoint (or a run directory's latest valid one): model, tokenizer, config."""
    from .api import load as _load
    return _load(path, device=device, which=which)
