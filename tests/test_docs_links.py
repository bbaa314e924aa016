"""Every relative link in the Markdown docs reaches a file, and every `#anchor` a heading.

docs/experiment.md's contents list links ~60 subsection titles by their GitHub anchors; a title
edited without its link would leave a dead link that nobody sees until they click it.
"""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def github_anchor(title):
    """GitHub's heading id: lower case; every character dropped but letters, marks, decimal and
    letter numbers, connector punctuation ('_'), '-' and ' ' (its `[^\\p{Word}\\- ]`); spaces
    turned into '-'. Runs of '-' stay, as on GitHub ("2.6 ± 1.5" -> "26--15")."""
    def kept(c):
        category = unicodedata.category(c)
        return c in "- " or category[0] in "LM" or category in ("Nd", "Nl", "Pc")
    return "".join(c for c in title.lower() if kept(c)).replace(" ", "-")


def anchors(path):
    """The ids of path's headings; a repeated id gets -1, -2, ... as on GitHub."""
    seen, ids = {}, set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"#{1,6} +(.*?) *#* *$", line):
            base = github_anchor(m.group(1))
            n = seen.get(base, 0)
            ids.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return ids


def test_anchor_rule_on_known_titles():
    assert github_anchor("Ten times the prompts at 13.8 M (2026-12-05): the drop is 6 points") == \
        "ten-times-the-prompts-at-138-m-2026-12-05-the-drop-is-6-points"
    assert github_anchor("The previous default: `Question:/Answer:` rendering") == \
        "the-previous-default-questionanswer-rendering"
    assert github_anchor("repair 2.6 ± 1.5, the ascent's share") == "repair-26--15-the-ascents-share"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = FENCE.sub("", doc.read_text())
    dead = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            dead.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            dead.append(f"{target}: no heading with that anchor in {path.relative_to(ROOT)}")
    assert not dead, f"{doc.relative_to(ROOT)}: dead links:\n" + "\n".join(dead)
