"""Caption metrics with the COCO caption toolkit (``pycocoevalcap``): BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

All scores are reported **x 100** (BLEU-4 36.2, CIDEr 120.5, ...) as in the captioning literature
(the toolkit itself returns fractions).

Pipeline (same as the official COCO evaluation):

1. References and predictions are tokenised with Stanford's PTBTokenizer (lower-cased, punctuation
   removed). We call the jar shipped with pycocoevalcap ourselves instead of its ``PTBTokenizer``
   class, because that class writes its temp file *into site-packages* (fails on read-only installs)
   and lets Java's progress line through to stderr. Command, options and punctuation list are the
   toolkit's own, so the tokens are identical.
2. ``Bleu(4)``, ``Meteor``, ``Rouge`` and ``Cider`` score the tokenised text. METEOR spawns
   ``java -jar meteor-1.5.jar`` (first scoring call ~8 s: it loads a 60 MB paraphrase table); the
   process is closed (stdin closed, waited for, killed if needed) before this function returns, so
   repeated calls in one process leave no Java process or zombie behind.

Caveats:

* CIDEr-D takes its IDF weights from the references of the *evaluated set*, so it needs many images
  to be meaningful; for a single image every n-gram has IDF 0 and CIDEr is 0.
* SPICE is never run: it downloads Stanford CoreNLP models on first use, impossible offline. It is
  reported as ``None`` with a note.
* Without ``java`` on PATH (or if the tokenizer jar fails) a regex tokenizer approximating PTB
  (lower-case, split words / punctuation, drop punctuation) is used and METEOR is skipped; scores are
  then close to, but not identical with, official numbers. ``result["tokenizer"]`` says which ran.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

__all__ = ["score_captions", "java_available", "SPICE_NOTE"]

SPICE_NOTE = "SPICE unavailable: needs Stanford CoreNLP models that cannot be downloaded here"
_SIMPLE_PUNCT = set("'\"`.?!,:;-()[]{}")


def java_available() -> bool:
    return shutil.which("java") is not None


def _clean(s: str) -> str:
    """One line, single spaces (str.split also breaks on \\r, \\u2028, \\x85 ...)."""
    return " ".join(str(s).split())


# ---------------------------------------------------------------- tokenisation

def _ptb_tokenize(sentences: list[str], timeout: float = 300.0) -> list[str]:
    """Stanford PTBTokenizer exactly as pycocoevalcap runs it, one output line per input line."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = Path(ptb.__file__).resolve().parent / ptb.STANFORD_CORENLP_3_4_1_JAR
    if not jar.is_file():
        raise FileNotFoundError(f"PTBTokenizer jar not found: {jar}")
    fd, tmp = tempfile.mkstemp(prefix="finealign-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(s + "\n" for s in sentences))
        cmd = ["java", "-Dfile.encoding=UTF-8", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", tmp]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    finally:
        os.unlink(tmp)
    if proc.returncode != 0:
        raise RuntimeError(f"PTBTokenizer exited with {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")
    lines = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if len(lines) < len(sentences):
        if all(not s for s in sentences[len(lines):]):   # trailing empty lines may be dropped
            lines += [""] * (len(sentences) - len(lines))
        else:
            raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in ptb.PUNCTUATIONS)
            for line in lines[:len(sentences)]]


def _simple_tokenize(sentences: list[str]) -> list[str]:
    """Java-free approximation of PTB + punctuation removal: ``"A dog's toy."`` -> ``"a dog 's toy"``."""
    out = []
    for s in sentences:
        toks = re.findall(r"\w+(?='\w)|'\w+|\w+|[^\w\s]+", s.lower())
        out.append(" ".join(t for t in toks if not set(t) <= _SIMPLE_PUNCT))
    return out


# ---------------------------------------------------------------- METEOR process

def _make_meteor(timeout: float):
    """pycocoevalcap's ``Meteor`` with a safer process: absolute paths, UTF-8, stderr to a temp file
    (an unread stderr pipe could fill up and hang Java), a watchdog that kills Java after ``timeout``
    seconds, and an explicit :meth:`close` (the stock ``__del__`` can deadlock on its lock if scoring
    raised half-way)."""
    from pycocoevalcap.meteor import meteor as meteor_mod

    class _Meteor(meteor_mod.Meteor):
        def __init__(self):  # noqa: D401 -- deliberately not calling super(): it spawns its own process
            jar_dir = Path(meteor_mod.__file__).resolve().parent
            if not (jar_dir / meteor_mod.METEOR_JAR).is_file():
                raise FileNotFoundError(f"METEOR jar not found: {jar_dir / meteor_mod.METEOR_JAR}")
            self.meteor_cmd = ["java", "-Dfile.encoding=UTF-8", "-jar", "-Xmx2G", meteor_mod.METEOR_JAR,
                               "-", "-", "-stdio", "-l", "en", "-norm"]
            self._stderr = tempfile.TemporaryFile()
            self.meteor_p = subprocess.Popen(self.meteor_cmd, cwd=str(jar_dir), stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=self._stderr)
            self.lock = threading.Lock()
            self.timed_out = False
            self._watchdog = threading.Timer(timeout, self._on_timeout)
            self._watchdog.daemon = True
            self._watchdog.start()

        def _on_timeout(self) -> None:
            p = self.meteor_p
            if p is not None and p.poll() is None:
                self.timed_out = True
                p.kill()

        def stderr_tail(self) -> str:
            try:
                self._stderr.seek(0)
                return self._stderr.read().decode(errors="replace")[-500:].strip()
            except (OSError, ValueError):
                return ""

        def close(self) -> None:
            p = getattr(self, "meteor_p", None)
            if p is None:
                return
            self._watchdog.cancel()
            try:
                if p.stdin and not p.stdin.closed:
                    p.stdin.close()          # Meteor -stdio exits at EOF
                p.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()                     # reap: no zombie
            finally:
                if p.stdout:
                    p.stdout.close()
                self._stderr.close()
                self.meteor_p = None

        def __del__(self):
            self.close()

    return _Meteor()


def _meteor_score(gts: dict, res: dict, timeout: float) -> float:
    # "|||" separates fields in METEOR's stdio protocol; the toolkit strips it from hypotheses only.
    gts = {k: [r.replace("|||", " ") for r in v] for k, v in gts.items()}
    m = _make_meteor(timeout)
    try:
        score, _ = m.compute_score(gts, res)
        return float(score)
    except Exception as e:
        if m.timed_out:
            raise RuntimeError(f"timed out after {timeout:g} s (java process killed)") from e
        tail = m.stderr_tail()
        raise RuntimeError(f"{type(e).__name__}: {e}" + (f" (java stderr: {tail})" if tail else "")) from e
    finally:
        m.close()


# ---------------------------------------------------------------- public API

def _validate(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str]) -> list:
    ref_keys, pred_keys = set(references), set(predictions)
    if ref_keys != pred_keys:
        missing = list(ref_keys - pred_keys)[:5]
        extra = list(pred_keys - ref_keys)[:5]
        raise ValueError(f"references and predictions must have the same keys: "
                         f"{len(ref_keys - pred_keys)} key(s) without a prediction (e.g. {missing}), "
                         f"{len(pred_keys - ref_keys)} prediction(s) without references (e.g. {extra})")
    if not ref_keys:
        raise ValueError("no captions to score (references and predictions are empty)")
    keys = list(references)
    for k in keys:
        refs, pred = references[k], predictions[k]
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise ValueError(f"references[{k!r}] must be a non-empty list of strings, got {refs!r}")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{k!r}] must contain only strings, got {refs!r}")
        if not isinstance(pred, str):
            raise ValueError(f"predictions[{k!r}] must be a single string, got {pred!r}")
    return keys


def score_captions(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str],
                   meteor: bool = True, tokenizer: str = "auto", timeout: float = 600.0) -> dict[str, Any]:
    """Score generated captions against references.

    Args:
        references: key -> list of reference captions (>= 1 each).
        predictions: key -> one generated caption; must have exactly the keys of ``references``.
        meteor: compute METEOR (needs Java; ~8 s JVM + paraphrase-table start-up per call).
        tokenizer: ``"auto"`` (PTB if Java works, else simple), ``"ptb"`` (error without Java) or
            ``"simple"``.
        timeout: seconds before a Java subprocess is killed.
    Returns:
        ``{"bleu1".."bleu4", "meteor", "rouge_l", "cider", "spice", "tokenizer", "num", "notes"}``:
        scores x 100 as floats (``meteor`` is ``None`` when skipped, ``spice`` always ``None``),
        ``tokenizer`` is ``"ptb"`` or ``"simple"``, ``num`` the number of scored captions and
        ``notes`` a list of strings explaining anything skipped or approximated.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenizer must be auto, ptb or simple, got {tokenizer!r}")
    keys = _validate(references, predictions)
    notes: list[str] = []
    has_java = java_available()
    if tokenizer == "ptb" and not has_java:
        raise RuntimeError("tokenizer='ptb' needs `java` on PATH")

    # one flat list -> one tokenizer call; remember which slice belongs to which key
    flat: list[str] = []
    spans: dict[Hashable, tuple[int, int]] = {}
    for k in keys:
        start = len(flat)
        flat.extend(_clean(r) for r in references[k])
        spans[k] = (start, len(flat))
    pred_start = len(flat)
    flat.extend(_clean(predictions[k]) for k in keys)

    used = "simple"
    tokens = None
    if tokenizer != "simple" and has_java:
        try:
            tokens, used = _ptb_tokenize(flat, timeout=timeout), "ptb"
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            if tokenizer == "ptb":
                raise
            notes.append(f"PTBTokenizer failed ({e}); used a simple regex tokenizer, scores are approximate")
    elif tokenizer == "auto":
        notes.append("java not found on PATH: used a simple regex tokenizer instead of PTBTokenizer "
                     "(scores approximate the official ones)")
    if tokens is None:
        tokens = _simple_tokenize(flat)

    gts = {k: tokens[a:b] for k, (a, b) in spans.items()}
    res = {k: [tokens[pred_start + i]] for i, k in enumerate(keys)}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out: dict[str, Any] = {f"bleu{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)}
    out.update(meteor=None, rouge_l=100.0 * float(rouge), cider=100.0 * float(cider), spice=None)

    if not meteor:
        notes.append("METEOR skipped (meteor=False)")
    elif not has_java:
        notes.append("METEOR skipped: java not found on PATH (it runs meteor-1.5.jar)")
    else:
        try:
            out["meteor"] = 100.0 * _meteor_score(gts, res, timeout)
        except (OSError, RuntimeError) as e:
            notes.append(f"METEOR failed: {e}")
    notes.append(SPICE_NOTE)
    out.update(tokenizer=used, num=len(keys), notes=notes)
    return out
