"""Captions for the emoji dataset: CLDR names -> parsed names (base, skin tones, hair) -> English captions.

``parse_name(":man_red_hair_medium_skin_tone:")`` gives the words, the base (``"man"``), the tones and the
hair style; ``caption_for`` turns a name into a readable lowercase caption with the right article
(``"an ogre"``, ``"a UFO"``, ``"two men"``), groups (``"family of a man and two girls"``) and modifiers
(``"... with red hair and medium skin tone"``). Used by :mod:`.emoji` to build the dataset.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
HAIR = ("bald", "beard", "blond_hair", "curly_hair", "red_hair", "white_hair")

_TONE_RE = re.compile(r"_(light|medium-light|medium|medium-dark|dark)_skin_tone")
_HAIR_RE = re.compile(r"^(man|woman|person)_(" + "|".join(HAIR) + r")$")
_ALIASES = {"kiss_person_person": "kiss", "couple_with_heart_person_person": "couple_with_heart"}
_GROUP_HEADS = {"family": "of", "kiss": "between", "couple_with_heart": "of"}
_MEMBERS = {"man": "men", "woman": "women", "person": "people", "boy": "boys", "girl": "girls",
            "adult": "adults", "child": "children"}
_COUNTS = {2: "two", 3: "three", 4: "four"}
_NO_ARTICLE_FIRST = {"people", "men", "women", "palms"}
_SINGULAR_S = {"claus", "mrs."}
_PERSONS = {"man", "woman", "person", "face", "men", "women", "people"}
_CAPS_WORDS = {"NEW", "UP!", "ON!", "END", "TOP", "ZZZ"}   # capitals read as words, not letters
_AN_LETTERS = set("aefhilmnorsx")           # letters whose spoken name starts with a vowel sound


# ----------------------------------------------------------------------------- names and captions

@dataclass(frozen=True)
class EmojiName:
    """A parsed CLDR name. ``words`` keep their original case (acronyms matter for the article)."""
    words: tuple[str, ...]
    base: str                      # lowercase base name, spaces (tones and hair removed)
    tones: tuple[str, ...]         # skin tones in name order, e.g. ("medium-dark", "dark")
    hair: str | None               # e.g. "red hair", "bald", "beard"
    flag: bool


def _is_flag(char: str) -> bool:
    return any(0x1F1E6 <= ord(c) <= 0x1F1FF for c in char) or (
        char.startswith("\U0001F3F4") and any(0xE0061 <= ord(c) <= 0xE007A for c in char))


def _clean(text: str) -> str:
    """ASCII, no quotes or brackets, single spaces (case kept)."""
    text = text.replace("\u2019", "'").replace("#", "number sign").replace("*", "asterisk")
    text = text.replace("&", "and")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[\"()\u201c\u201d]", "", text.replace("_", " "))
    return re.sub(r"\s+", " ", text).strip()


def parse_name(cldr: str, char: str = "") -> EmojiName:
    """``':man_red_hair_medium_skin_tone:'``-style names -> words, base, tones, hair, flag."""
    name = cldr.strip(":")
    tones = tuple(_TONE_RE.findall(name))
    rest = _TONE_RE.sub("", name)
    hair = None
    m = _HAIR_RE.match(rest.lower())
    if m:
        rest, hair = m.group(1), m.group(2).replace("_", " ")
    rest = _ALIASES.get(rest, rest)
    words = tuple(_clean(rest).split(" "))
    return EmojiName(words, " ".join(words).lower(), tones, hair, _is_flag(char))


def _article(words: Sequence[str]) -> str:
    """``"a "``, ``"an "`` or ``""`` (plurals and mass nouns) for a noun phrase."""
    first = words[0]
    low = first.lower()
    head = [w.lower() for w in words]
    for i, w in enumerate(head[1:], 1):      # head noun phrase: up to "with"/"of"/... (or a verb)
        if w in ("with", "in", "of", "on", "for") or (w.endswith("ing") and head[0] in _PERSONS):
            head = head[:i]
            break
    last = head[-1]
    if low in _NO_ARTICLE_FIRST or last in ("skis", "tennis") or (last.endswith("s") and not last.endswith(("ss", "us", "is", "os", "'s"))
                                    and last not in _SINGULAR_S and len(last) > 2):
        return ""
    acronym = first.isupper() and len(first.rstrip("!")) <= 3 and first not in _CAPS_WORDS
    if acronym:
        return "an " if low[0] in _AN_LETTERS else "a "
    if low[0].isdigit():
        return "an " if low.startswith("8") or low in ("11", "18") else "a "
    if low.startswith(("one", "uni", "use", "eu", "ewe", "ufo")):
        return "a "
    return "an " if low[0] in "aeiou" or low.startswith("hour") else "a "


def tone_phrase(tones: Sequence[str]) -> str:
    """``("medium-dark", "dark")`` -> ``"medium-dark and dark skin tones"``; ``()`` -> ``""``."""
    uniq = list(dict.fromkeys(tones))
    if not uniq:
        return ""
    if len(uniq) == 1:
        return f"{uniq[0]} skin tone"
    return ", ".join(uniq[:-1]) + f" and {uniq[-1]} skin tones"


def _members_phrase(members: list[str]) -> str:
    counts = {m: members.count(m) for m in dict.fromkeys(members)}
    parts = [f"{_COUNTS.get(n, str(n))} {_MEMBERS[m]}" if n > 1 else f"{_article([m])}{m}"
             for m, n in counts.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption_for(cldr: str, char: str = "") -> str:
    """Readable lowercase caption for an emoji's CLDR name (``char`` tells flags apart).

    >>> caption_for(":man_office_worker_medium-dark_skin_tone:")
    'a man office worker with medium-dark skin tone'
    """
    p = parse_name(cldr, char)
    words = list(p.words)
    if p.flag:
        return f"the flag of {' '.join(words).lower()}"
    if len(words) == 1 and words[0][0].isupper() and words[0][1:].islower():
        return f"the zodiac sign {words[0].lower()}"          # Aries, Taurus, ... (proper nouns)
    text = " ".join(words).lower()
    for head, joiner in _GROUP_HEADS.items():
        prefix = head.replace("_", " ")
        members = text[len(prefix):].split()
        if text.startswith(prefix + " ") and members and all(m in _MEMBERS for m in members):
            text = f"{prefix} {joiner} {_members_phrase(members)}"
            break
    mods = []
    if p.hair == "bald":
        text = "bald " + text
    elif p.hair == "beard":
        mods.append("a beard")
    elif p.hair:
        mods.append(p.hair)
    if p.tones:
        mods.append(tone_phrase(p.tones))
    art = _article(text.split(" ") if p.hair == "bald" else words)
    caption = art + text + (" with " + " and ".join(mods) if mods else "")
    return caption.lower()
