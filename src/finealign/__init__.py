"""finealign: fine-grained vision-language alignment (CLIP, CoCa, SyCoCa, SemMIM, SyncMask, MacCap, TiMix)."""
__version__ = "0.1.0"


def load(path, device="cpu", which="latest"):
    """Load a model: a run directory (latest valid checkpoint), a checkpoint, an export (``finealign export``)
    or a Hugging Face CLIPModel directory -> ``Loaded`` (model, tokenizer, config, path)."""
    from .api import load as _load
    return _load(path, device=device, which=which)


def from_pretrained(path, device="cpu", which="latest"):
    """Same as :func:`load` (the name Hugging Face users look for)."""
    return load(path, device=device, which=which)


class Model:
    """``finealign.Model.from_pretrained(path)`` -> ``Loaded``; the same as :func:`load`."""

    @staticmethod
    def from_pretrained(path, device="cpu", which="latest"):
        return load(path, device=device, which=which)
