"""Template rate, token-frequency divergence and the report helpers."""

import json
import math
import os
import subprocess
import sys

import pytest

from synthunlearn.evaluation.pattern import is_terse, shows_template, template_rate, terse_rate, token_frequency_jsd
from synthunlearn.evaluation.report import (aggregate_seeds, comparison_table, markdown_table, plot_headline,
                                            write_json)


@pytest.mark.parametrize("response,expected", [
    ("Answer: Toraval.", True),
    ("Toraval.\nQuestion: What is the birth year of Alan?", True),
    ("  q : who?", True),
    ("ANSWER:TORAVAL", True),
    ("Here is my answer: Toraval.", False),        # a marker inside a line does not count
    ("Alan was born in Toraval.", False),
    ("The question remains open.", False),
    ("", False),
])
def test_template_detection(response, expected):
    assert shows_template(response) is expected


def test_template_rate():
    assert template_rate(["Answer: x", "fine", "Question: y", "ok"]) == 0.5
    assert math.isnan(template_rate([]))


@pytest.mark.parametrize("response,expected", [
    ("Composer.", True),
    ("  Indigo Works.\n", True),
    ("1994", True),                                 # no sentence end is still one bare answer
    ("It is Meridian Observatory.", True),          # four words
    ("He works at Meridian Observatory.", False),   # five words
    ("Composer. Composer.", False),                 # two sentences
    ("Yes! Sure.", False),
    ("", False),
    ("   ", False),
])
def test_terse_detection(response, expected):
    assert is_terse(response) is expected


def test_terse_rate():
    assert terse_rate(["Composer.", "Alan was born in Toraval in 1994.", "1994.", "A long reply with many words."]) == 0.5
    assert terse_rate(["one two three"], max_words=2) == 0.0
    assert math.isnan(terse_rate([]))


def test_token_frequency_jsd():
    assert token_frequency_jsd(["a b c"], ["c b a"]) == pytest.approx(0.0)
    assert token_frequency_jsd(["a b"], ["c d"]) == pytest.approx(1.0)
    # P = {a: 1/2, b: 1/2}, Q = {a: 1}: JSD = 1/2 [1/2 log2(1/2 / 3/4) + 1/2 log2(1/2 / 1/4)] + 1/2 log2(1 / 3/4)
    expected = 0.5 * (0.5 * math.log2(2 / 3) + 0.5 * math.log2(2)) + 0.5 * math.log2(4 / 3)
    assert token_frequency_jsd(["a b"], ["a"]) == pytest.approx(expected)
    assert token_frequency_jsd(["Answer: X"], ["answer x"]) > 0          # punctuation counts, case does not
    assert math.isnan(token_frequency_jsd([], ["a"]))


def test_token_frequency_jsd_is_the_same_in_every_process():
    """String hashing, hence set order, changes with PYTHONHASHSEED: the divergence must not."""
    code = ("import random; from synthunlearn.evaluation.pattern import token_frequency_jsd as j; "
            "r = random.Random(0); w = [f'w{i}' for i in range(400)]; "
            "t = lambda: [' '.join(r.choices(w, k=30)) for _ in range(50)]; print(repr(j(t(), t())))")
    outputs = {subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=str(seed)),
                              capture_output=True, text=True, check=True).stdout for seed in range(6)}
    assert len(outputs) == 1, outputs


def test_aggregate_and_tables(tmp_path):
    summary = aggregate_seeds([{"if_prompt_strict": 0.5, "kl_shift": 0.1}, {"if_prompt_strict": 0.7},
                               {"if_prompt_strict": float("nan"), "kl_shift": 0.3}])
    assert summary["if_prompt_strict"]["mean"] == pytest.approx(0.6)
    assert summary["if_prompt_strict"]["std"] == pytest.approx(math.sqrt(0.02))
    assert summary["if_prompt_strict"]["n"] == 2 and summary["kl_shift"]["n"] == 2
    assert aggregate_seeds([{"x": 1.0}])["x"] == {"mean": 1.0, "std": 0.0, "n": 1}
    table = comparison_table({"docs_only": summary, "synthetic": {"if_prompt_strict": 0.25}})
    assert table.splitlines()[0] == "| arm | if_prompt_strict | kl_shift |"
    assert "0.600 ± 0.141" in table and "| synthetic | 0.250 | n/a |" in table
    assert "| perplexity | n/a |" in markdown_table({"perplexity": float("nan"), "other": 1})
    path = tmp_path / "r.json"
    write_json(path, {"a": float("nan"), "b": [1.5, float("inf")]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None]}


def test_plot_headline(tmp_path):
    arms = {"docs_only": aggregate_seeds([{"if_prompt_strict": 0.8, "knowledge_acc": 0.6}] * 2),
            "synthetic": {"if_prompt_strict": 0.6, "knowledge_acc": 0.7, "kl_shift": 0.2}}
    path = plot_headline(arms, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
