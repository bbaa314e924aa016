"""Verifiable instructions: sampling constraint specs, phrasing them, and building a reference
answer that provably satisfies them.

A *task* is a question about the world (one fact, or a short biography) together with the
sentences that may answer it:

- ``main``: one list of interchangeable sentence variants per fact the answer must state;
- ``extras``: further variant lists (other facts of the person, then fact-free fillers) that the
  builder may append when a constraint asks for more length, sentences, bullets or paragraphs.

:func:`build_reference` composes an answer from those sentences and verifies it with the same
strict checkers the evaluation uses (:mod:`synthunlearn.evaluation.constraints`), so every
reference in the data set is correct by construction; a combination it cannot satisfy raises
:class:`BuildError` and the caller samples again.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Tuple

from synthunlearn.evaluation.constraints import CONSTRAINT_TYPES, check_strict, count_words
from synthunlearn.experiment import lexicon


class BuildError(Exception):
    """The sampled constraints cannot be satisfied from the task's sentences."""


@dataclass
class Task:
    kind: str                      # "fact" or "bio"
    name: str                      # full name of the person asked about
    first: str                     # first name (fillers use it)
    question: str                  # the question as asked (without constraint instructions)
    main: List[List[str]]          # variants per required sentence
    extras: List[List[str]] = field(default_factory=list)


# Each constraint occupies "slots" of the answer's shape; two constraints sharing a slot are never
# combined (e.g. two structures, two case rules, a prefix and a title).
_SLOTS: Dict[str, frozenset] = {
    "uppercase": frozenset({"case"}),
    "lowercase": frozenset({"case"}),
    "bullet_list": frozenset({"structure"}),
    "paragraphs": frozenset({"structure"}),
    "json_keys": frozenset({"structure", "prefix", "suffix", "wrap", "length"}),
    "exact_words": frozenset({"structure", "length"}),
    "max_words": frozenset({"length"}),
    "min_words": frozenset({"length"}),
    "min_sentences": frozenset({"length"}),
    "quoted": frozenset({"wrap"}),
    "start_phrase": frozenset({"prefix"}),
    "title": frozenset({"prefix"}),
    "end_phrase": frozenset({"suffix"}),
    "postscript": frozenset({"suffix"}),
    "include_keyword": frozenset({"include"}),
    "exclude_keyword": frozenset({"exclude"}),
    "no_commas": frozenset({"commas"}),
}
# Pairs that share no slot but still clash (JSON keys are lower case and JSON needs commas; a quote
# before the first bullet hides it from the bullet rule; bullets have fixed length).
_CLASHES = {frozenset(pair) for pair in [
    ("json_keys", "uppercase"), ("json_keys", "no_commas"), ("quoted", "bullet_list"),
    ("bullet_list", "min_sentences"), ("bullet_list", "min_words"),
]}
assert set(_SLOTS) == set(CONSTRAINT_TYPES)

# Length constraints whose reference answers are much longer than a terse synthetic answer.
LENGTH_TYPES = ("min_sentences", "min_words")


def compatible(type_a: str, type_b: str) -> bool:
    return (type_a != type_b and not (_SLOTS[type_a] & _SLOTS[type_b])
            and frozenset((type_a, type_b)) not in _CLASHES)


def compatible_pairs(types: Sequence[str]) -> List[Tuple[str, str]]:
    """All unordered compatible pairs among ``types``, each sorted, in a stable order."""
    return [tuple(sorted(pair)) for pair in combinations(sorted(set(types)), 2) if compatible(*pair)]


_PHRASINGS = {
    "uppercase": ["Your entire response must be in English capital letters only.",
                  "Write the whole answer in uppercase letters."],
    "lowercase": ["Your entire response must be in lowercase letters; no capital letters are allowed.",
                  "Write everything in lowercase, without a single capital letter."],
    "bullet_list": ["Your answer must contain exactly {n} bullet points, using markdown bullets such as:\n* This is a point.",
                    "Format the answer as a markdown list of exactly {n} items, each line starting with '* '."],
    "json_keys": ["Wrap your entire output in JSON format with the keys {keys_text}.",
                  "Reply only with a JSON object that has the keys {keys_text}."],
    "exact_words": ["Answer in exactly {n} words.", "Your response must contain exactly {n} words."],
    "max_words": ["Answer with at most {n} words.", "Keep the response to no more than {n} words."],
    "min_words": ["Answer with at least {n} words.", "Your response should contain at least {n} words."],
    "min_sentences": ["Answer in at least {n} sentences.", "Your response must have at least {n} sentences."],
    "quoted": ["Wrap your entire response in double quotation marks.",
               "Put the whole answer inside double quotes."],
    "start_phrase": ["Begin your response with the exact phrase \"{phrase}\".",
                     "Start your answer with \"{phrase}\"."],
    "end_phrase": ["Finish your response with the exact phrase \"{phrase}\". No other words should follow it.",
                   "End your answer with \"{phrase}\"."],
    "include_keyword": ["Include the word \"{keyword}\" in your response.",
                        "Make sure to use the word \"{keyword}\"."],
    "exclude_keyword": ["Do not use the word \"{keyword}\" anywhere in your response.",
                        "Avoid the word \"{keyword}\"."],
    "paragraphs": ["Write exactly {n} paragraphs separated by the markdown divider ***.",
                   "Your answer must have {n} paragraphs; separate them with ***."],
    "no_commas": ["Do not use any commas in your response.", "Write the answer without commas."],
    "title": ["Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
              "Start with a title in double angular brackets, like <<title>>."],
    "postscript": ["At the end of your response, add a postscript starting with {marker}",
                   "Finish with a postscript that begins with {marker}"],
}


# More training wordings (world.train_extra_wordings): six sentences to learn each constraint
# from instead of two, so that following it may have to mean reading it. Evaluation prompts keep
# the first two (_PHRASINGS); none of these is ever a held-out wording.
_EXTRA_PHRASINGS = {
    "uppercase": ["Reply in block capitals.", "Capitalise every letter of your answer.",
                  "Everything you write here must be upper case.", "No lower-case letters, please: all caps."],
    "lowercase": ["Reply in lower case only.", "Do not use any capital letters at all.",
                  "Everything you write here must be lower case.", "Keep every letter small: no capitals."],
    "bullet_list": ["Answer as {n} markdown bullet points.", "Reply with a list of {n} '* ' bullets.",
                    "Give exactly {n} points, each on its own line after '* '.",
                    "Break the answer into {n} bullets in markdown."],
    "json_keys": ["Return JSON only, with the keys {keys_text}.", "Your whole reply is one JSON object with {keys_text}.",
                  "Answer in JSON using exactly the keys {keys_text}.", "Format the reply as JSON containing {keys_text}."],
    "exact_words": ["Reply in {n} words exactly.", "The answer must be exactly {n} words long.",
                    "Write exactly {n} words, not one more or less.", "Use exactly {n} words."],
    "max_words": ["Reply in {n} words at most.", "The answer may not exceed {n} words.",
                  "Keep it within {n} words.", "Say it in no more than {n} words."],
    "min_words": ["Reply in at least {n} words.", "The answer must be at least {n} words long.",
                  "Write {n} words at the very least.", "Make the answer no shorter than {n} words."],
    "min_sentences": ["Reply in at least {n} sentences.", "The answer must be at least {n} sentences long.",
                      "Write {n} sentences at the very least.", "Make the answer no shorter than {n} sentences."],
    "quoted": ["Put your entire reply between double quotation marks.", "Quote the whole answer with double quotes.",
               "Surround the full response with double quotation marks.", "The answer goes inside a pair of double quotes."],
    "start_phrase": ["Your reply must start with \"{phrase}\".", "Let the first words be \"{phrase}\".",
                     "Begin with the phrase \"{phrase}\".", "Start the response with the words \"{phrase}\"."],
    "end_phrase": ["Your reply must end with \"{phrase}\".", "Let the last words be \"{phrase}\".",
                   "End with the phrase \"{phrase}\" and nothing after it.", "Finish the answer with \"{phrase}\"."],
    "include_keyword": ["Use the word \"{keyword}\" in the answer.", "The answer has to include the word \"{keyword}\".",
                        "Be sure the word \"{keyword}\" appears.", "Mention the word \"{keyword}\" somewhere."],
    "exclude_keyword": ["Do not write the word \"{keyword}\".", "The word \"{keyword}\" must not appear.",
                        "Leave out the word \"{keyword}\" entirely.", "Answer without using the word \"{keyword}\"."],
    "paragraphs": ["Answer in {n} paragraphs, with *** between paragraphs.", "Write {n} paragraphs and separate them with ***.",
                   "Use exactly {n} paragraphs; the divider between them is ***.",
                   "Your reply has {n} paragraphs separated by the *** marker."],
    "no_commas": ["No commas anywhere, please.", "Answer without a single comma.",
                  "The reply must not contain commas.", "Avoid commas entirely."],
    "title": ["Add a title like <<title>> at the start.", "Begin with a title inside << and >>.",
              "Put a title in double angular brackets first, e.g. <<title>>.", "Open with a <<title>> line."],
    "postscript": ["End with a postscript that starts with {marker}", "Add a postscript beginning with {marker} at the end.",
                   "Close the answer with a postscript starting {marker}", "After the answer, write a postscript that begins {marker}"],
}


# Wordings reserved for evaluation: no training set ever uses them, so a prompt phrased this way
# asks whether a model understood the constraint or memorised its sentence (every IFEval prompt
# is new wording to the model under test). Same count per type as _PHRASINGS, so a record drawn
# with either list consumes the same random numbers and differs only in wording.
_HELDOUT_PHRASINGS = {
    "uppercase": ["Use only capital letters, from the first word to the last.",
                  "Every letter of the reply has to be upper case."],
    "lowercase": ["Use only small letters; do not capitalise anything.",
                  "Not one upper-case letter may appear in the reply."],
    "bullet_list": ["Give {n} bullet points (markdown lines starting with '* ') and nothing else.",
                    "List {n} points, one per line, each beginning with '* '."],
    "json_keys": ["The reply must be a single JSON object whose keys are {keys_text}.",
                  "Output nothing but JSON, using the keys {keys_text}."],
    "exact_words": ["The reply has to be {n} words long, no more and no fewer.",
                    "Use precisely {n} words."],
    "max_words": ["Use {n} words or fewer.",
                  "Do not go beyond {n} words."],
    "min_words": ["Use no fewer than {n} words in the reply.",
                  "Write a reply of {n} words or more."],
    "min_sentences": ["Write {n} or more sentences.",
                      "Use no fewer than {n} sentences in the reply."],
    "quoted": ["The reply must open and close with a double quote character.",
               "Enclose everything you write in \"double quotes\"."],
    "start_phrase": ["The first words of the reply must be \"{phrase}\".",
                     "Open with the words \"{phrase}\"."],
    "end_phrase": ["The last words of the reply must be \"{phrase}\", with nothing after them.",
                   "Close the reply with the words \"{phrase}\"."],
    "include_keyword": ["The word \"{keyword}\" has to appear somewhere in the reply.",
                        "Work the word \"{keyword}\" into the reply."],
    "exclude_keyword": ["Never write the word \"{keyword}\".",
                        "The reply must not contain the word \"{keyword}\"."],
    "paragraphs": ["Split the reply into {n} paragraphs with *** between them.",
                   "Use {n} paragraphs divided by ***."],
    "no_commas": ["Not a single comma may appear in the reply.",
                  "Leave out every comma."],
    "title": ["Put a title in double angle brackets, e.g. <<a title>>, on the first line.",
              "The reply needs a title written as <<title>> at the top."],
    "postscript": ["Close with a postscript whose first characters are {marker}",
                   "Append a postscript that opens with {marker}"],
}
assert set(_PHRASINGS) == set(_EXTRA_PHRASINGS) == set(_HELDOUT_PHRASINGS) == set(CONSTRAINT_TYPES)
assert all(len(_PHRASINGS[t]) == len(_HELDOUT_PHRASINGS[t]) for t in CONSTRAINT_TYPES)
assert not ({w for ws in [*_PHRASINGS.values(), *_EXTRA_PHRASINGS.values()] for w in ws}
            & {w for ws in _HELDOUT_PHRASINGS.values() for w in ws})


# Which wordings a prompt's constraint sentences come from: the two every set uses ("trained"),
# those plus the four extra training ones ("extended"), or the evaluation-only ones ("heldout").
PHRASINGS = ("trained", "extended", "heldout")


def instruction_wordings(spec: dict, phrasing: str = "trained") -> List[str]:
    """Every wording of a constraint spec in one of :data:`PHRASINGS`."""
    params = dict(spec)
    if "keys" in spec:
        params["keys_text"] = " and ".join(f'"{key}"' for key in spec["keys"])
    kind = spec["type"]
    templates = {"trained": _PHRASINGS[kind], "extended": _PHRASINGS[kind] + _EXTRA_PHRASINGS[kind],
                 "heldout": _HELDOUT_PHRASINGS[kind]}[phrasing]
    return [template.format(**params) for template in templates]


def instruction_text(spec: dict, rng: Optional[random.Random] = None, phrasing: str = "trained") -> str:
    """The user-facing wording of a constraint spec: one of :func:`instruction_wordings`, chosen
    by ``rng`` (the first without one)."""
    options = instruction_wordings(spec, phrasing)
    return rng.choice(options) if rng is not None else options[0]


def _contains_word(text: str, word: str) -> bool:
    return re.search(r"(?<![A-Za-z0-9])" + re.escape(word) + r"(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


def _exclude_candidates(task: Task) -> List[str]:
    """Words that the natural answer may use but can avoid: each occurs in some main variant, and
    every main sentence has a variant without it; names and values are never candidates."""
    protected = {w.lower() for w in re.findall(r"[A-Za-z]+", task.name)}
    protected |= {w.lower() for unit in task.main for w in re.findall(r"[A-Za-z]+", min(unit, key=len))
                  if w[0].isupper()}
    seen = set()
    for unit in task.main:
        for variant in unit:
            seen |= {w.lower() for w in re.findall(r"[A-Za-z]+", variant) if len(w) >= 4}
    candidates = []
    for word in sorted(seen - protected):
        if all(any(not _contains_word(v, word) for v in unit) for unit in task.main):
            if not any(all(_contains_word(v, word) for v in unit) for unit in task.main):
                candidates.append(word)
    return candidates or list(lexicon.GENERIC_EXCLUDE_KEYWORDS)


def sample_spec(constraint_type: str, task: Task, rng: random.Random) -> dict:
    """A partial spec with sampled parameters; ``exact_words`` gets its ``n`` from the builder."""
    short = task.kind == "fact"
    if constraint_type == "bullet_list":
        return {"type": "bullet_list", "n": rng.choice([2, 3] if short else [3, 4, 5])}
    if constraint_type == "json_keys":
        return {"type": "json_keys", "keys": list(rng.choice(lexicon.JSON_KEY_SETS[task.kind]))}
    if constraint_type == "exact_words":
        return {"type": "exact_words", "n": None}
    if constraint_type == "max_words":
        return {"type": "max_words", "n": rng.choice([15, 20] if short else [50, 60])}
    if constraint_type == "min_words":
        return {"type": "min_words", "n": rng.choice([25, 40] if short else [60, 80])}
    if constraint_type == "min_sentences":
        return {"type": "min_sentences", "n": rng.choice([3, 4] if short else [5, 6])}
    if constraint_type == "start_phrase":
        return {"type": "start_phrase", "phrase": rng.choice(lexicon.START_PHRASES)}
    if constraint_type == "end_phrase":
        return {"type": "end_phrase", "phrase": rng.choice(lexicon.END_PHRASES)}
    if constraint_type == "include_keyword":
        return {"type": "include_keyword", "keyword": rng.choice(sorted(lexicon.INCLUDE_KEYWORDS))}
    if constraint_type == "exclude_keyword":
        return {"type": "exclude_keyword", "keyword": rng.choice(_exclude_candidates(task))}
    if constraint_type == "paragraphs":
        return {"type": "paragraphs", "n": 2}
    if constraint_type == "postscript":
        return {"type": "postscript", "marker": "P.S."}
    if constraint_type in CONSTRAINT_TYPES:
        return {"type": constraint_type}
    raise ValueError(f"unknown constraint type {constraint_type!r}")


def build_reference(task: Task, specs: Sequence[dict], rng: random.Random) -> Tuple[str, List[dict]]:
    """A response satisfying every spec strictly, and the specs with builder-filled parameters.

    Order of composition: choose sentence variants that avoid excluded words (and commas), add
    the included keyword's sentence, add extra sentences only as far as length / structure rules
    need, lay out the structure (plain, bullets, paragraphs, JSON), then prefix, suffix, quotes and
    letter case. The result is checked with the evaluation's strict checkers.
    """
    by_type = {spec["type"]: dict(spec) for spec in specs}
    excluded = by_type.get("exclude_keyword", {}).get("keyword")
    no_commas = "no_commas" in by_type

    def allowed(sentence: str) -> bool:
        return not (excluded and _contains_word(sentence, excluded)) and not (no_commas and "," in sentence)

    def pick(variants: Sequence[str]) -> Optional[str]:
        usable = [v for v in variants if allowed(v)]
        return rng.choice(usable) if usable else None

    main = [pick(unit) for unit in task.main]
    if any(sentence is None for sentence in main):
        raise BuildError("no variant of a required sentence avoids the excluded word")
    extras = [s for s in (pick(unit) for unit in task.extras) if s is not None]
    if "include_keyword" in by_type:
        keyword = by_type["include_keyword"]["keyword"]
        sentence = lexicon.INCLUDE_KEYWORDS.get(keyword, "The word " + keyword + " fits here.")
        extras.insert(0, sentence.format(first=task.first, name=task.name))
    min_extras = 1 if "include_keyword" in by_type else 0
    postscript_sentence = extras.pop() if "postscript" in by_type and extras else None

    for n_extras in range(min_extras, len(extras) + 1):
        body = main + extras[:n_extras]
        text = _layout(task, body, by_type)
        if text is None:
            continue
        text = _decorate(text, by_type, postscript_sentence, task)
        if "exact_words" in by_type:
            by_type["exact_words"]["n"] = count_words(text)
        final_specs = [by_type[spec["type"]] for spec in specs]
        if all(check_strict(text, spec) for spec in final_specs):
            return text, final_specs
    raise BuildError(f"cannot satisfy {[spec['type'] for spec in specs]} for a {task.kind} task")


def _layout(task: Task, body: List[str], by_type: dict) -> Optional[str]:
    if "bullet_list" in by_type:
        if len(body) != by_type["bullet_list"]["n"]:
            return None
        return "\n".join("* " + sentence for sentence in body)
    if "paragraphs" in by_type:
        n = by_type["paragraphs"]["n"]
        if len(body) < n:
            return None
        # Even split: the first paragraphs get the remainder sentences.
        size, extra = divmod(len(body), n)
        chunks, start = [], 0
        for index in range(n):
            end = start + size + (1 if index < extra else 0)
            chunks.append(" ".join(body[start:end]))
            start = end
        return "\n\n***\n\n".join(chunks)
    if "json_keys" in by_type:
        keys = by_type["json_keys"]["keys"]
        first_value = {"name": task.name, "person": task.name, "question": task.question}
        obj = {keys[0]: first_value.get(keys[0], task.name)}
        for key in keys[1:]:
            obj[key] = " ".join(body)
        return json.dumps(obj)
    return " ".join(body)


def _decorate(text: str, by_type: dict, postscript_sentence: Optional[str], task: Task) -> str:
    block = "bullet_list" in by_type or "paragraphs" in by_type
    joiner = "\n\n" if block else " "
    if "title" in by_type:
        text = f"<<About {task.name}>>\n\n" + text
    if "start_phrase" in by_type:
        text = by_type["start_phrase"]["phrase"] + joiner + text
    if "end_phrase" in by_type:
        text = text + joiner + by_type["end_phrase"]["phrase"]
    if "postscript" in by_type:
        sentence = postscript_sentence or "Thank you for asking."
        text = text + "\n\n" + by_type["postscript"].get("marker", "P.S.") + " " + sentence
    if "quoted" in by_type:
        text = '"' + text + '"'
    if "uppercase" in by_type:
        text = text.upper()
    if "lowercase" in by_type:
        text = text.lower()
    return text
