"""Every checker with passing and failing examples, strict and loose, and edge cases."""

import pytest

from synthunlearn.evaluation.constraints import (CONSTRAINT_TYPES, check_loose, check_strict, count_sentences,
                                                 count_words, loose_variants)
from synthunlearn.evaluation.ifeval import if_accuracy

# (spec, response, strict, loose)
CASES = [
    ({"type": "uppercase"}, "TORAVAL IS THE CITY. 1987!", True, True),
    ({"type": "uppercase"}, "TORAVAL is the city.", False, False),
    ({"type": "uppercase"}, "1987", False, False),                       # no cased letter
    ({"type": "uppercase"}, "Sure:\nTORAVAL.", False, True),             # loose drops the first line
    ({"type": "lowercase"}, "toraval is the city.", True, True),
    ({"type": "lowercase"}, "Toraval is the city.", False, False),
    ({"type": "lowercase"}, "toraval.\nHope This Helps", False, True),   # loose drops the last line
    ({"type": "bullet_list", "n": 2}, "* one\n* two", True, True),
    ({"type": "bullet_list", "n": 2}, "- one\n- two", True, True),
    ({"type": "bullet_list", "n": 2}, "* one\n* two\n* three", False, True),  # loose drops a line
    ({"type": "bullet_list", "n": 3}, "* one\n* two", False, False),
    ({"type": "bullet_list", "n": 1}, "**bold** text\n* item", True, True),   # ** is not a bullet
    ({"type": "json_keys", "keys": ["name", "answer"]}, '{"name": "A", "answer": "B"}', True, True),
    ({"type": "json_keys", "keys": ["name", "answer"]}, '```json\n{"name": "A", "answer": "B"}\n```', True, True),
    ({"type": "json_keys", "keys": ["name", "answer"]}, '{"name": "A"}', False, False),
    ({"type": "json_keys", "keys": ["name"]}, '["name"]', False, False),
    ({"type": "json_keys", "keys": ["name"]}, 'Here it is:\n{"name": "A"}', False, True),
    ({"type": "exact_words", "n": 4}, "Alan was born there.", True, True),
    ({"type": "exact_words", "n": 4}, "Alan was born in Toraval.", False, False),
    ({"type": "max_words", "n": 3}, "It is Toraval.", True, True),
    ({"type": "max_words", "n": 2}, "It is Toraval.", False, False),
    ({"type": "min_words", "n": 5}, "one two three four five", True, True),
    ({"type": "min_words", "n": 5}, "one two three four", False, False),
    ({"type": "min_sentences", "n": 3}, "One. Two! Three?", True, True),
    ({"type": "min_sentences", "n": 3}, "Born in 1987. P.S. short.", False, False),   # P.S. and 1987. don't split
    ({"type": "min_sentences", "n": 2}, "* first item\n* second item", True, True),   # lines are sentences
    ({"type": "quoted"}, '"Toraval."', True, True),
    ({"type": "quoted"}, "Toraval.", False, False),
    ({"type": "quoted"}, '"', False, False),
    ({"type": "start_phrase", "phrase": "Sure thing."}, '"sure thing. Toraval."', True, True),
    ({"type": "start_phrase", "phrase": "Sure thing."}, "Toraval. Sure thing.", False, False),
    ({"type": "end_phrase", "phrase": "That is all I know."}, "Toraval. THAT IS ALL I KNOW.", True, True),
    ({"type": "end_phrase", "phrase": "That is all I know."}, "That is all I know. Toraval.", False, False),
    ({"type": "end_phrase", "phrase": "That is all I know."}, "Toraval. That is all I know.\nBye", False, True),
    ({"type": "include_keyword", "keyword": "career"}, "A long Career indeed.", True, True),
    ({"type": "include_keyword", "keyword": "career"}, "Careers are long.", False, False),   # whole word
    ({"type": "exclude_keyword", "keyword": "born"}, "Alan comes from Toraval; reborn.", True, True),
    ({"type": "exclude_keyword", "keyword": "born"}, "Alan was BORN in Toraval.", False, False),
    ({"type": "paragraphs", "n": 2}, "First part.\n\n***\n\nSecond part.", True, True),
    ({"type": "paragraphs", "n": 2}, "First part.\n***\nSecond.\n***", True, True),  # trailing divider ok
    ({"type": "paragraphs", "n": 2}, "One.\n***\n***\nTwo.", False, False),          # empty middle paragraph
    ({"type": "paragraphs", "n": 2}, "Only one paragraph.", False, False),
    ({"type": "no_commas"}, "No commas here.", True, True),
    ({"type": "no_commas"}, "Yes, a comma.", False, False),
    ({"type": "title"}, "<<About Alan>>\nHe was born.", True, True),
    ({"type": "title"}, "<<>> He was born.", False, False),
    ({"type": "title"}, "<About Alan> He was born.", False, False),
    ({"type": "postscript", "marker": "P.S."}, "Toraval.\n\nP.S. Ask again.", True, True),
    ({"type": "postscript", "marker": "P.S."}, "Toraval.\np. s. ask again.", True, True),
    ({"type": "postscript", "marker": "P.S."}, "Toraval. P.S. inline does not count.", False, False),
]


@pytest.mark.parametrize("spec,response,strict,loose", CASES)
def test_checker_cases(spec, response, strict, loose):
    assert check_strict(response, spec) is strict
    assert check_loose(response, spec) is loose


def test_every_type_has_passing_and_failing_cases():
    passing = {spec["type"] for spec, _, strict, _ in CASES if strict}
    failing = {spec["type"] for spec, _, strict, _ in CASES if not strict}
    assert passing == failing == set(CONSTRAINT_TYPES)


def test_empty_response_fails_every_constraint_even_exclusions():
    for kind in ("exclude_keyword", "no_commas", "max_words"):
        spec = {"type": kind, "keyword": "x", "n": 5}
        assert not check_strict("  \n", spec) and not check_loose("", spec)


def test_loose_strips_markdown_stars():
    spec = {"type": "end_phrase", "phrase": "That is all I know."}
    assert not check_strict("Toraval. **That is all I know.**", spec)
    assert check_loose("Toraval. **That is all I know.**", spec)
    assert len(loose_variants("a\nb\nc")) == 8


def test_counting_definitions():
    assert count_words("Don't stop: well-known P.S. 1987") == 6   # P, S
    assert count_sentences("Dr Who was born in 1987. Then? Yes!!  And then") == 4
    assert count_sentences("We met in the U.S. last year. P.S. Write soon.") == 2
    assert count_sentences("") == 0


def test_unknown_type_is_an_error():
    with pytest.raises(ValueError, match="unknown constraint type"):
        check_strict("x", {"type": "rhymes"})


def test_if_accuracy_levels():
    records = [
        {"constraints": [{"type": "lowercase"}, {"type": "no_commas"}], "split": "single"},
        {"constraints": [{"type": "quoted"}], "split": "heldout_pair"},
        {"constraints": [{"type": "uppercase"}], "split": "single"},
    ]
    responses = ["all lower, with comma", '"quoted"', "Sure:\nUPPER"]
    scores = if_accuracy(records, responses)
    assert scores["prompt_strict"] == pytest.approx(1 / 3)
    assert scores["instruction_strict"] == pytest.approx(2 / 4)
    assert scores["prompt_loose"] == pytest.approx(2 / 3)
    assert scores["instruction_loose"] == pytest.approx(3 / 4)
    assert scores["per_type"]["no_commas"] == {"accuracy": 0.0, "count": 1}
    assert scores["per_group"]["split"]["heldout_pair"]["prompt_strict"] == 1.0
    # Per prompt, in input order; their mean is the prompt-level strict rate.
    assert scores["prompt_strict_hits"] == [0, 1, 0]
    with pytest.raises(ValueError):
        if_accuracy(records, responses[:2])
