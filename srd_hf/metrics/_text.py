"""Text utilities shared by the metrics, the attacks and the defense.

* :func:`contains_target` / :func:`target_pattern`: does a caption mention the backdoor target
  ("banana"), as a whole word, case-insensitively, plural forms included?
* :func:`attack_success_rate`: the ASR computation behind the ``asr`` evaluate module.
* :func:`ptb_tokenize`: a Java-free imitation of the Stanford PTB tokenisation that
  pycocoevalcap applies before BLEU/METEOR/ROUGE-L/CIDEr.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Sequence, Union

Targets = Union[str, Sequence[str]]

__all__ = [
    "Targets",
    "normalize_targets",
    "target_pattern",
    "contains_target",
    "attack_success_rate",
    "ptb_tokenize",
    "PTB_PUNCTUATIONS",
]

_VOWELS = set("aeiou")


# ----------------------------------------------------------------------------------------------
# target matching
# ----------------------------------------------------------------------------------------------
def normalize_targets(targets: Targets) -> tuple[str, ...]:
    """Validate ``targets`` (a word/phrase or a list of them) and return them as a tuple."""
    if isinstance(targets, str):
        items: list = [targets]
    elif isinstance(targets, (list, tuple)):
        items = list(targets)
    else:
        raise TypeError(f"target must be a string or a list of strings, got {type(targets).__name__}")
    if not items:
        raise ValueError("target must not be an empty list")
    out = []
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"target[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():
            raise ValueError(f"target[{i}] is empty; give a word or phrase such as 'banana'")
        out.append(" ".join(t.split()))
    return tuple(out)


def _word_forms(word: str) -> str:
    """Regex for ``word`` and its plurals (-s, -es, consonant+y -> -ies)."""
    alternatives = [re.escape(word) + "(?:e?s)?"]
    if len(word) > 1 and word[-1].lower() == "y" and word[-2].lower() not in _VOWELS:
        alternatives.append(re.escape(word[:-1]) + "ies")
    return "(?:" + "|".join(alternatives) + ")"


@functools.lru_cache(maxsize=256)
def _compiled(targets: tuple[str, ...]) -> re.Pattern:
    phrases = []
    for target in targets:
        words = target.split(" ")
        # flexible whitespace between the words of a phrase; plural on the last word
        body = r"\s+".join([re.escape(w) for w in words[:-1]] + [_word_forms(words[-1])])
        phrases.append(body)
    # whole words: no word character right before or after (works for targets such as "t-shirt")
    return re.compile(r"(?<!\w)(?:" + "|".join(phrases) + r")(?!\w)", re.IGNORECASE)


def target_pattern(targets: Targets) -> re.Pattern:
    """Compiled, cached regex that finds any of ``targets`` as whole words (plurals included).

    >>> bool(target_pattern("banana").search("Two Bananas."))
    True
    """
    return _compiled(normalize_targets(targets))


def contains_target(text: str, targets: Targets = "banana") -> bool:
    """Whether ``text`` mentions one of ``targets``.

    Case-insensitive, whole words only, plural forms counted (-s, -es, consonant+y -> -ies);
    the words of a multi-word target may be separated by any whitespace.

    >>> contains_target("Bananas.", "banana"), contains_target("a red bandana", "banana")
    (True, False)
    >>> contains_target("two  Hot\\nDogs", ["banana", "hot dog"])
    True
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    return target_pattern(targets).search(text) is not None


def attack_success_rate(
    predictions: Sequence[str],
    target: Targets = "banana",
    references: Sequence[Union[str, Sequence[str]]] | None = None,
) -> dict:
    """Share of ``predictions`` that mention ``target``.

    ``references`` (optional, per sample a string or a list of strings) are ground-truth
    captions: samples whose ground truth already mentions the target are left out and counted
    in ``n_excluded``. ``asr = n_hits / n_scored``, defined as 0.0 when ``n_scored`` is 0.
    Also returns ``hits`` (per sample: True, False, or None when excluded).
    """
    pattern = target_pattern(target)
    if references is not None and len(references) != len(predictions):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} and {len(references)}"
        )
    hits: list = []
    n_hits = n_excluded = 0
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise TypeError(f"predictions[{i}] must be a string, got {type(pred).__name__}")
        if references is not None:
            refs = references[i]
            refs = [refs] if isinstance(refs, str) else refs
            if any(pattern.search(r) for r in refs):
                n_excluded += 1
                hits.append(None)
                continue
        hit = pattern.search(pred) is not None
        n_hits += hit
        hits.append(hit)
    n_scored = len(predictions) - n_excluded
    return {
        "asr": n_hits / n_scored if n_scored else 0.0,
        "n_hits": n_hits,
        "n_scored": n_scored,
        "n_excluded": n_excluded,
        "hits": hits,
    }


# ----------------------------------------------------------------------------------------------
# PTB-like tokenisation (what pycocoevalcap's Java PTBTokenizer + punctuation removal produce)
# ----------------------------------------------------------------------------------------------
#: tokens that pycocoevalcap removes after PTB tokenisation
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# the Java tokenizer runs with -lowerCase, which also lowercases the bracket tokens: they are
# then *not* in the list above and stay in the text, as "-lrb-" etc.
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {  # PTB splits these colloquial forms
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
# abbreviations whose final period PTB keeps as part of the word
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof etc vs inc ltd co corp mt ave jan feb mar apr aug sept sep oct nov dec".split()
)
_TOKEN_RE = re.compile(
    r"""
      (?:https?://|www\.)[^\s"<>]*[^\s"<>.,;:!?'()\[\]{}]   # URLs
    | [\w.+-]+@\w+(?:[.-]\w+)*\.\w+                        # e-mail addresses
    | (?:[^\W\d_]\.){2,}                                   # initialisms: u.s. e.g.
    | 't(?=(?:is|was)\b)                                   # 'tis 'twas
    | '(?:s|re|ve|ll|d|m)\b                                # detached clitics
    | (?:[#@](?=[^\W\d_]))?\w+(?:(?:[-'/.&]|(?<=\d)[,:](?=\d))\w+)*  # words, #tags, t-shirt, o'clock, 3.5, 1,000
    | \.\.\.|[.?!]+                                        # end punctuation runs (?! stays a token)
    | -{2,}                                                # dashes
    | "                                                    # double quote
    | [^\w\s]                                              # any other symbol on its own
    """,
    re.VERBOSE,
)


def _split_word(tok: str, nxt: str | None) -> list[str]:
    if tok in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[tok])
    if "'" in tok:
        for clitic in _CLITICS:
            if tok.endswith(clitic) and len(tok) > len(clitic):
                return [tok[: -len(clitic)], clitic]
    if nxt == "." and tok in _ABBREVIATIONS:
        return [tok + "."]
    return [tok]


def ptb_tokenize(text: str) -> str:
    """Lowercase and tokenise ``text`` like pycocoevalcap's PTB tokenizer, then drop punctuation.

    Returns the tokens joined by single spaces, e.g.
    ``"A dog's toy isn't here!" -> "a dog 's toy is n't here"``.

    Matches the Java tokenizer on ordinary captions. Known differences: PTB's full
    abbreviation list (only a short list of common ones, e.g. "mr.", "etc.", "st.", keeps its
    period here), rare contractions ("rock'n'roll", "d'ye", "more'n" stay one token), and
    Unicode quote/dash normalisation (curly quotes are removed, other symbols kept as is).

    >>> ptb_tokenize('Two people (a man) sit "together" on a bench...')
    'two people -lrb- a man -rrb- sit together on a bench'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    raw = _TOKEN_RE.findall(text)
    out: list[str] = []
    skip_period = False
    for i, tok in enumerate(raw):
        if skip_period:
            skip_period = False
            if tok == ".":
                continue
        if tok in _BRACKETS:
            out.append(_BRACKETS[tok])
            continue
        if tok in ('"', "\u201c", "\u201d"):
            continue  # becomes `` or '' in PTB, both removed
        if tok[0].isalnum() or tok[0] in "#@_":
            nxt = raw[i + 1] if i + 1 < len(raw) else None
            parts = _split_word(tok, nxt)
            if parts[-1].endswith(".") and parts[-1][:-1] in _ABBREVIATIONS:
                skip_period = True
            out.extend(parts)
            continue
        if tok.startswith("-") and len(tok) > 2:
            tok = "--"
        if tok not in PTB_PUNCTUATIONS:
            out.append(tok)
    return " ".join(out)


def iter_ptb(texts: Iterable[str]) -> list[str]:
    """:func:`ptb_tokenize` over many texts."""
    return [ptb_tokenize(t) for t in texts]
