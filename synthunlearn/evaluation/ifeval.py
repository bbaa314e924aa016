"""Instruction-following accuracy, IFEval-style, from responses and constraint specs.

Each evaluation record carries ``"constraints": [spec, ...]`` (see :mod:`.constraints`). For a set
of (record, response) pairs:

- ``prompt_strict``: fraction of prompts whose response satisfies *all* of its constraints under
  the strict protocol; ``prompt_loose`` likewise under the loose protocol.
- ``instruction_strict``: fraction of all (prompt, constraint) pairs satisfied strictly (each
  constraint of each prompt counts once); ``instruction_loose`` likewise loosely.
- ``per_type``: instruction-level strict accuracy and count for each constraint type.
- ``per_group``: prompt-level strict accuracy and count for each value of the record fields named
  in ``group_by`` (e.g. ``split`` = single constraint vs held-out composition, ``wording``,
  ``placement`` = constraints after or before the question, ``phrasing`` = constraint sentences
  worded as in training or in wordings reserved for evaluation).

- ``prompt_strict_hits``: 1 or 0 per prompt, in input order (strict): arms scored on the same
  prompts pair prompt by prompt (:func:`synthunlearn.evaluation.statistics.prompt_sampling_se`).

All rates are in [0, 1]; an empty input gives ``nan`` rates and zero counts.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence

from synthunlearn.evaluation.constraints import check_loose, check_strict


def score_response(response: str, constraints: Sequence[dict]) -> Dict[str, List[bool]]:
    """Per-constraint strict and loose verdicts for one response."""
    return {
        "strict": [check_strict(response, spec) for spec in constraints],
        "loose": [check_loose(response, spec) for spec in constraints],
    }


def _rate(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def if_accuracy(records: Sequence[dict], responses: Sequence[str],
                group_by: Iterable[str] = ("split", "wording", "placement", "phrasing")) -> dict:
    """Prompt- and instruction-level strict/loose accuracy (definitions in the module docstring)."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    group_by = tuple(group_by)
    prompt_hits = {"strict": 0, "loose": 0}
    instruction_hits = {"strict": 0, "loose": 0}
    n_instructions = 0
    hits: List[int] = []   # per prompt, strict: pairs arms prompt by prompt (statistics.prompt_sampling_se)
    type_hits: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    group_hits: Dict[str, Dict[str, List[int]]] = {field: defaultdict(lambda: [0, 0]) for field in group_by}
    for record, response in zip(records, responses):
        verdicts = score_response(response, record["constraints"])
        hits.append(int(all(verdicts["strict"])))
        for protocol in ("strict", "loose"):
            prompt_hits[protocol] += all(verdicts[protocol])
            instruction_hits[protocol] += sum(verdicts[protocol])
        n_instructions += len(record["constraints"])
        for spec, ok in zip(record["constraints"], verdicts["strict"]):
            type_hits[spec["type"]][0] += ok
            type_hits[spec["type"]][1] += 1
        for field in group_by:
            if field in record:
                group_hits[field][str(record[field])][0] += all(verdicts["strict"])
                group_hits[field][str(record[field])][1] += 1
    n_prompts = len(records)
    return {
        "prompt_strict": _rate(prompt_hits["strict"], n_prompts),
        "prompt_loose": _rate(prompt_hits["loose"], n_prompts),
        "instruction_strict": _rate(instruction_hits["strict"], n_instructions),
        "instruction_loose": _rate(instruction_hits["loose"], n_instructions),
        "n_prompts": n_prompts,
        "n_instructions": n_instructions,
        "prompt_strict_hits": hits,
        "per_type": {name: {"accuracy": _rate(hit, total), "count": total}
                     for name, (hit, total) in sorted(type_hits.items())},
        "per_group": {field: {value: {"prompt_strict": _rate(hit, total), "count": total}
                              for value, (hit, total) in sorted(groups.items())}
                      for field, groups in group_hits.items() if groups},
    }
