"""The ``finealign`` command (console script) and ``python -m finealign``."""
from .cli import main


def entry() -> None:
    """``main()``, then the process ends through ``distributed.exit_process``: a multi-rank torchrun run
    skips the interpreter's shutdown, where gloo's leftover worker threads can abort it (see there)."""
    rc = main()
    from .distributed import exit_process
    exit_process(rc)


if __name__ == "__main__":
    entry()
