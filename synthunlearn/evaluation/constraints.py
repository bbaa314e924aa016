"""Deterministic checkers for verifiable format constraints (IFEval-style).

A constraint is a JSON-serialisable spec ``{"type": <name>, **params}``. Every checker is a pure
function ``(response: str, spec: dict) -> bool``; :func:`check_strict` and :func:`check_loose`
add IFEval's strict / loose protocols on top.

Shared definitions (used by the checkers, by the world's reference-answer builder and in the
README):

- **word**: a maximal run of ASCII letters or digits, optionally joined by an apostrophe or
  hyphen to further runs (``don't``, ``well-known`` are one word each; ``1987`` is a word;
  ``P.S.`` is two words). See :func:`count_words`.
- **sentence**: each non-empty line is split after ``.``, ``!`` or ``?`` (one or more) when they
  are followed by whitespace, a closing quote/bracket or the end of the line; a segment counts as
  a sentence when it contains a letter or digit. Initialisms such as ``P.S.`` (a terminator
  right after ``.X``) never end a sentence, and ``1987.`` only ends one when followed by a space. See :func:`count_sentences`.

Constraint types (params in brackets):

==================  ======================================================================
uppercase           every cased character is upper case and there is at least one
lowercase           every cased character is lower case and there is at least one
bullet_list (n)     exactly n markdown bullet lines (``* item`` or ``- item``, IFEval's rule)
json_keys (keys)    the response (optionally inside a ```json fence) parses as a JSON object
                    containing every key in ``keys``
exact_words (n)     exactly n words
max_words (n)       at most n words
min_words (n)       at least n words
min_sentences (n)   at least n sentences
quoted              the stripped response starts and ends with a straight double quote
start_phrase        the response, stripped of whitespace and a leading ``"``, starts with
  (phrase)          ``phrase`` (case-insensitive)
end_phrase          the response, stripped of whitespace and ``"``, ends with ``phrase``
  (phrase)          (case-insensitive; IFEval's rule)
include_keyword     ``keyword`` occurs as a whole word (case-insensitive)
  (keyword)
exclude_keyword     ``keyword`` does not occur as a whole word (case-insensitive)
  (keyword)
paragraphs (n)      exactly n non-empty paragraphs separated by the markdown divider ``***``
                    (IFEval's rule: an empty paragraph is allowed only first or last)
no_commas           no ``,`` anywhere
title               a title in double angular brackets, ``<<like this>>``, on one line
postscript          a line starting with the marker, default ``P.S.`` (case-insensitive,
  (marker)          ``P. S.`` accepted as IFEval does)
==================  ======================================================================

**Strict** (IFEval): the response is non-empty after stripping and the checker accepts it.
**Loose** (IFEval): the checker accepts at least one of eight variants -- the response, with its
first line removed, with its last line removed, with both removed, and each of those four with
every ``*`` deleted -- a variant counting only when it is non-empty after stripping.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Dict, List

_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['\u2019-][A-Za-z0-9]+)*")
# A terminator splits only when followed by whitespace, a closing quote/bracket or end of line,
# so abbreviations written without spaces ("P.S.") and numbers stay inside their sentence.
# Initialisms ("P.S.", "U.S.") never end a sentence.
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])(?<!\.[A-Za-z]\.)(?=\s|$|[\"')\]])\s*")
_HAS_ALNUM_RE = re.compile(r"[A-Za-z0-9]")


def count_words(text: str) -> int:
    """Number of words as defined in the module docstring."""
    return len(_WORD_RE.findall(text))


def words(text: str) -> List[str]:
    """The words of ``text`` (module definition), in order."""
    return _WORD_RE.findall(text)


def split_sentences(text: str) -> List[str]:
    """Sentences as defined in the module docstring, stripped, in order."""
    sentences = []
    for line in text.splitlines():
        for segment in _SENTENCE_SPLIT_RE.split(line):
            segment = segment.strip()
            if _HAS_ALNUM_RE.search(segment):
                sentences.append(segment)
    return sentences


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def _keyword_re(keyword: str) -> re.Pattern:
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(keyword) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def _parse_json_object(text: str):
    """The JSON value of ``text``, allowing a surrounding ```json fence; None if unparsable."""
    stripped = text.strip()
    fence = re.match(r"^```(?:json|JSON)?\s*\n?(.*?)\n?```$", stripped, re.DOTALL)
    if fence:
        stripped = fence.group(1).strip()
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):
        return None


def _check_uppercase(response, spec):
    return response.isupper()


def _check_lowercase(response, spec):
    return response.islower()


def _check_bullet_list(response, spec):
    star_bullets = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dash_bullets = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(star_bullets) + len(dash_bullets) == int(spec["n"])


def _check_json_keys(response, spec):
    value = _parse_json_object(response)
    return isinstance(value, dict) and all(key in value for key in spec.get("keys", []))


def _check_exact_words(response, spec):
    return count_words(response) == int(spec["n"])


def _check_max_words(response, spec):
    return count_words(response) <= int(spec["n"])


def _check_min_words(response, spec):
    return count_words(response) >= int(spec["n"])


def _check_min_sentences(response, spec):
    return count_sentences(response) >= int(spec["n"])


def _check_quoted(response, spec):
    stripped = response.strip()
    return len(stripped) > 1 and stripped[0] == '"' and stripped[-1] == '"'


def _check_start_phrase(response, spec):
    text = response.strip().lstrip('"').lower()
    return text.startswith(spec["phrase"].strip().lower())


def _check_end_phrase(response, spec):
    text = response.strip().strip('"').lower()
    return text.endswith(spec["phrase"].strip().lower())


def _check_include_keyword(response, spec):
    return _keyword_re(spec["keyword"]).search(response) is not None


def _check_exclude_keyword(response, spec):
    return _keyword_re(spec["keyword"]).search(response) is None


def _check_paragraphs(response, spec):
    parts = re.split(r"\s?\*\*\*\s?", response)
    count = len(parts)
    for index, part in enumerate(parts):
        if not part.strip():
            # IFEval tolerates a divider at the very start or end, nowhere else.
            if index == 0 or index == len(parts) - 1:
                count -= 1
            else:
                return False
    return count == int(spec.get("n", 2))


def _check_no_commas(response, spec):
    return "," not in response


def _check_title(response, spec):
    return any(title.strip("<>").strip() for title in re.findall(r"<<[^\n]+?>>", response))


def _check_postscript(response, spec):
    marker = spec.get("marker", "P.S.").strip().lower()
    if marker == "p.s.":
        pattern = r"^\s*p\.\s?s\..*$"
    else:
        pattern = r"^\s*" + re.escape(marker) + r".*$"
    return re.search(pattern, response.lower(), flags=re.MULTILINE) is not None


CHECKERS: Dict[str, Callable[[str, dict], bool]] = {
    "uppercase": _check_uppercase,
    "lowercase": _check_lowercase,
    "bullet_list": _check_bullet_list,
    "json_keys": _check_json_keys,
    "exact_words": _check_exact_words,
    "max_words": _check_max_words,
    "min_words": _check_min_words,
    "min_sentences": _check_min_sentences,
    "quoted": _check_quoted,
    "start_phrase": _check_start_phrase,
    "end_phrase": _check_end_phrase,
    "include_keyword": _check_include_keyword,
    "exclude_keyword": _check_exclude_keyword,
    "paragraphs": _check_paragraphs,
    "no_commas": _check_no_commas,
    "title": _check_title,
    "postscript": _check_postscript,
}

CONSTRAINT_TYPES = tuple(CHECKERS)


def _checker(spec: dict) -> Callable[[str, dict], bool]:
    try:
        return CHECKERS[spec["type"]]
    except KeyError:
        raise ValueError(f"unknown constraint type {spec.get('type')!r}; known: {', '.join(CONSTRAINT_TYPES)}")


def check_strict(response: str, spec: dict) -> bool:
    """IFEval strict: non-empty response accepted by the checker as is."""
    checker = _checker(spec)
    return bool(response.strip()) and checker(response, spec)


def loose_variants(response: str) -> List[str]:
    """IFEval's eight loose variants of a response (see the module docstring)."""
    lines = response.split("\n")
    without_first = "\n".join(lines[1:]).strip()
    without_last = "\n".join(lines[:-1]).strip()
    without_both = "\n".join(lines[1:-1]).strip()
    variants = [response, without_first, without_last, without_both]
    return variants + [variant.replace("*", "") for variant in variants]


def check_loose(response: str, spec: dict) -> bool:
    """IFEval loose: some non-empty loose variant is accepted by the checker."""
    checker = _checker(spec)
    return any(variant.strip() and checker(variant, spec) for variant in loose_variants(response))
