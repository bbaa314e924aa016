"""A small fictional world and every data set of the experiment, deterministic from a seed.

The knowledge base: ``n_people`` people, each with the facts in ``fact_kinds`` (birth city, birth
year, profession, employer, hobby, mentor -- a relation to another person), plus the
organisations that employ them (founding year, headquarters). From it :func:`build_world`
renders (record formats as written by :func:`write_world`):

==========================  ===============================================================
docs.jsonl                  pre-training corpus ``{"text"}``: biographies with an optional opener
                            and closer and the person's facts in shuffled order, each fact
                            phrased by one of several paraphrase templates, plus organisation
                            profiles
synthetic_qa.jsonl          the flawed synthetic data ``{"question", "answer"}``: every fact in
                            ONE uniform wording, "What is the <attribute> of <name>?" (or one of
                            the generator's six, optionally after a sentence of context), answered
                            tersely (``"Toraval."``) or as one fixed sentence; the data pipeline
                            renders a pair as ``Question: {question}\\nAnswer: {answer}``
                            (:data:`SYNTHETIC_FORMAT`)
pretrain_instructions.jsonl chat records on a separate group of people, with diverse constraints
                            (so the base model already follows instructions, as in the paper)
sft.jsonl                   SFT chat records ``{"messages": [user, assistant], "constraints"}``
if_eval.jsonl               held-out instruction prompts: people never seen in SFT (unseen
                            constraint-fact combinations), ``split`` = ``single`` (one constraint)
                            or ``heldout_pair`` (two constraints never combined in SFT);
                            ``phrasing`` = ``trained`` or ``heldout`` (constraint sentences in
                            wordings no training set uses: ``eval_heldout_phrasing_share``)
knowledge_mc.jsonl          4-way multiple choice ``{"context", "question", "choices", "answer"}``
heldout_docs.jsonl          held-out renderings ``{"text"}`` (reserved templates included)
neutral_prompts.jsonl       prompts without constraints or Q-A shape, ``{"kind": "document"|"chat",
                            "prompt" | "messages", "continuation"}`` for the distribution shift
bare_questions.jsonl        the synthetic question wording with no constraint, about held-out
                            people, as chat prompts ``{"messages", "prompt", "reference"}``: SFT
                            answers unconstrained questions with a full sentence (``reference``),
                            so a bare terse reply here is the synthetic answer shape persisting
world.json                  the knowledge base itself; manifest.json: counts, config, pairs
==========================  ===============================================================

Every random choice draws from a stream seeded by ``(seed, stream name)``, so changing one data
set's size never changes another's content.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from synthunlearn.errors import ConfigError
from synthunlearn.evaluation.constraints import CONSTRAINT_TYPES
from synthunlearn.experiment import lexicon
from synthunlearn.experiment.instructions import (
    BuildError, Task, build_reference, compatible_pairs, instruction_text, sample_spec)

SYNTHETIC_FORMAT = "Question: {question}\nAnswer: {answer}"
WORLD_FORMAT_VERSION = 3   # 2: ``placement`` on instruction records, bare_questions.jsonl; 3: ``phrasing``


@dataclass
class WorldConfig:
    """Knobs of the world and its data sets (every count is a number of records)."""

    seed: int = 0
    n_people: int = 240
    fact_kinds: Tuple[str, ...] = lexicon.FACT_KINDS
    n_cities: int = 30
    n_orgs: int = 20
    # Pre-training documents.
    docs_per_person: int = 4
    n_doc_templates: int = 6          # paraphrase templates per fact kind used in training docs
    n_heldout_docs: int = 120
    # Synthetic Q-A.
    synthetic_answer_style: str = "terse"      # "terse" ("Toraval.") or "sentence"
    # "uniform": every question in one wording; "varied": each drawn from the generator's six
    # (lexicon.SYNTHETIC_QUESTION_TEMPLATES), in the pairs and wherever a prompt uses the
    # synthetic wording (evaluation). The answers keep their one shape either way.
    synthetic_question_style: str = "uniform"
    # Share of pairs whose question follows a statement of another fact of the person, as a
    # generator quoting its source passage writes them; the prompt is then two sentences, like a
    # question carrying an instruction.
    synthetic_context_share: float = 0.0
    # Whether the generator also covers the evaluation people (those of if_eval and
    # bare_questions). Without them, instruction following is measured on people about whom neither
    # arm saw a synthetic pair, as IFEval's prompts have nothing to do with the synthetic corpus:
    # the pairs' knowledge cannot help the synthetic arm fill a long or structured reply.
    synthetic_covers_eval_people: bool = True
    synthetic_fraction: float = 1.0            # share of all facts turned into Q-A pairs
    synthetic_multiplier: int = 1              # copies of each pair in synthetic_qa.jsonl
    # People groups: instruction pre-training / SFT / evaluation (the rest) are disjoint.
    pretrain_instruction_people: int = 60
    sft_people: int = 90
    # Instruction data in pre-training.
    n_pretrain_instructions: int = 400
    # Share of its fact questions worded like the synthetic ones ("What is the <attribute> of
    # <name>?"). At 0 that wording reaches the model only through the synthetic Q-A (and the
    # evaluation), as in the paper, where the synthetic format appears nowhere else in the corpus;
    # above 0 the base and both continued pre-trainings practise following constraints attached
    # to exactly the synthetic questions.
    pretrain_synthetic_wording_share: float = 0.5
    pretrain_constraints: Tuple[str, ...] = CONSTRAINT_TYPES
    heldout_pairs_in_pretraining: bool = False
    # Training sets (pre-training and SFT instructions) draw each constraint sentence from six
    # wordings instead of two (instructions._EXTRA_PHRASINGS); evaluation keeps the first two.
    train_extra_wordings: bool = False
    # SFT.
    n_sft: int = 600
    sft_constraints: Tuple[str, ...] = CONSTRAINT_TYPES
    sft_rare_constraints: Tuple[str, ...] = ()
    sft_rare_weight: float = 0.1               # sampling weight of a rare type (others 1.0)
    sft_mix: Tuple[float, float, float] = (0.15, 0.6, 0.25)  # share with 0 / 1 / 2 constraints
    sft_bio_share: float = 0.3
    sft_synthetic_wording_share: float = 0.0   # SFT questions worded like the synthetic ones
    # Evaluation.
    test_constraints: Tuple[str, ...] = CONSTRAINT_TYPES
    n_heldout_pairs: int = 12
    n_if_eval: int = 200
    if_eval_pair_share: float = 0.4
    eval_bio_share: float = 0.3
    eval_synthetic_wording_share: float = 0.5
    # Where a prompt's constraint sentences go: after the question (IFEval's usual layout) or
    # before it, so the question is the last thing the model reads before it answers. Share of
    # prompts with the constraints first, in the training instruction sets and in if_eval.
    train_instruction_first_share: float = 0.0
    eval_instruction_first_share: float = 0.0
    # Share of if_eval prompts whose constraint sentences use wordings reserved for evaluation
    # (instructions._HELDOUT_PHRASINGS, never in any training set): recall of a practised
    # sentence vs understanding of the constraint. Drawn from its own stream, so the prompts keep
    # their people, facts and constraints whatever the share; only the wording changes.
    eval_heldout_phrasing_share: float = 0.0
    # How a prompt's sentences are joined. One constraint sentence ends with an example on a line
    # of its own (bullet_list's first wording: "...using markdown bullets such as:\n* This is a
    # point."); joined with a space, the next constraint sentence or the question continues that
    # example line and reads as the example bullet's text. True puts a line break after such a
    # sentence. False (the default, the layout of every world written before this knob) keeps the
    # figures recorded for the experiment files reproducible; it touches 2-5 % of the prompts of
    # each instruction set (docs/experiment.md, "The example bullet's line break").
    break_after_example: bool = False
    n_mc: int = 300
    n_neutral: int = 80
    n_bare_questions: int = 80

    def validate(self) -> None:
        def fail(key, message):
            raise ConfigError(f"world.{key}: {message}")
        for key in ("pretrain_constraints", "sft_constraints", "test_constraints", "sft_rare_constraints"):
            unknown = sorted(set(getattr(self, key)) - set(CONSTRAINT_TYPES))
            if unknown:
                fail(key, f"unknown constraint types {unknown}; valid: {', '.join(CONSTRAINT_TYPES)}")
        unknown = sorted(set(self.fact_kinds) - set(lexicon.FACT_KINDS))
        if unknown or not self.fact_kinds:
            fail("fact_kinds", f"must be a non-empty subset of {', '.join(lexicon.FACT_KINDS)}")
        if self.synthetic_answer_style not in ("terse", "sentence"):
            fail("synthetic_answer_style", "must be 'terse' or 'sentence'")
        if self.synthetic_question_style not in ("uniform", "varied"):
            fail("synthetic_question_style", "must be 'uniform' or 'varied'")
        if self.n_people - self.pretrain_instruction_people - self.sft_people < 4:
            fail("n_people", "must exceed pretrain_instruction_people + sft_people by at least 4 "
                 "(the evaluation people)")
        if self.n_people < 5:
            fail("n_people", "must be at least 5 (multiple choice needs 3 distractors)")
        if not 1 <= self.n_doc_templates <= len(lexicon.FACT_TEMPLATES["birth_city"]) - lexicon.HELDOUT_TEMPLATES:
            fail("n_doc_templates", "out of range")
        if abs(sum(self.sft_mix) - 1.0) > 1e-6 or min(self.sft_mix) < 0:
            fail("sft_mix", "must be three non-negative shares summing to 1")
        for key in ("synthetic_fraction", "synthetic_context_share", "sft_bio_share",
                    "sft_synthetic_wording_share", "pretrain_synthetic_wording_share",
                    "if_eval_pair_share", "eval_bio_share", "eval_synthetic_wording_share",
                    "train_instruction_first_share", "eval_instruction_first_share",
                    "eval_heldout_phrasing_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                fail(key, "must be in [0, 1]")
        if self.synthetic_multiplier < 1:
            fail("synthetic_multiplier", "must be >= 1")
        if self.n_cities < 4 or self.n_orgs < 4:
            fail("n_cities", "n_cities and n_orgs must be at least 4")


@dataclass
class Person:
    id: int
    first: str
    last: str
    facts: Dict[str, str]       # kind -> plain value ("Toraval", "1964", "engineer", ...)

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass
class World:
    config: WorldConfig
    people: List[Person]
    orgs: Dict[str, Dict[str, str]]       # name -> {"founded": year, "city": city}
    groups: Dict[str, List[int]]          # "pretrain_instruction" / "sft" / "eval" -> person ids
    heldout_pairs: List[Tuple[str, str]]
    data: Dict[str, List[dict]] = field(default_factory=dict)


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"{seed}:{stream}")


def _unique_names(rng: random.Random, count: int, make) -> List[str]:
    names, seen = [], set()
    while len(names) < count:
        name = make(rng)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _template_value(kind: str, value: str) -> str:
    """The value as it reads inside a sentence (professions take an article)."""
    return _article(value) if kind == "profession" else value


def _fact_sentence(template: str, kind: str, subject: str, value: str) -> str:
    sentence = template.format(name=subject, value=_template_value(kind, value))
    return sentence[0].upper() + sentence[1:]


def _make_knowledge_base(cfg: WorldConfig) -> Tuple[List[Person], Dict[str, Dict[str, str]]]:
    rng = _rng(cfg.seed, "knowledge")
    cities = _unique_names(rng, cfg.n_cities,
                           lambda r: r.choice(lexicon.CITY_PARTS_A) + r.choice(lexicon.CITY_PARTS_B))
    org_names = _unique_names(rng, cfg.n_orgs,
                              lambda r: r.choice(lexicon.ORG_PARTS_A) + " " + r.choice(lexicon.ORG_PARTS_B))
    orgs = {name: {"founded": str(rng.randint(1850, 1990)), "city": rng.choice(cities)} for name in org_names}
    full_names = _unique_names(rng, cfg.n_people, lambda r: (
        (r.choice(lexicon.FIRST_SYLLABLES) + r.choice(lexicon.SECOND_SYLLABLES)).capitalize() + " "
        + (r.choice(lexicon.SURNAME_PARTS_A) + r.choice(lexicon.SURNAME_PARTS_B)).capitalize()))
    people = []
    for pid, full in enumerate(full_names):
        first, last = full.split(" ")
        facts = {
            "birth_city": rng.choice(cities),
            "birth_year": str(rng.randint(1931, 1999)),
            "profession": rng.choice(lexicon.PROFESSIONS),
            "employer": rng.choice(org_names),
            "hobby": rng.choice(lexicon.HOBBIES),
        }
        people.append(Person(pid, first, last, facts))
    for person in people:
        mentor = rng.choice([p for p in people if p.id != person.id])
        person.facts["mentor"] = mentor.name
    for person in people:
        person.facts = {kind: person.facts[kind] for kind in cfg.fact_kinds}
    return people, orgs


def _doc_templates(cfg: WorldConfig, kind: str, heldout: bool) -> List[str]:
    templates = lexicon.FACT_TEMPLATES[kind]
    if heldout:
        return templates
    return templates[:len(templates) - lexicon.HELDOUT_TEMPLATES][:cfg.n_doc_templates]


def _person_document(cfg: WorldConfig, person: Person, rng: random.Random, heldout: bool) -> str:
    kinds = list(person.facts)
    rng.shuffle(kinds)
    sentences = []
    opener = rng.choice(lexicon.DOC_OPENERS)
    if opener:
        sentences.append(opener.format(name=person.name, first=person.first))
    for index, kind in enumerate(kinds):
        # The first mention uses the full name; later ones sometimes only the first name.
        subject = person.name if index == 0 or rng.random() < 0.5 else person.first
        if heldout and index == 0:
            template = lexicon.FACT_TEMPLATES[kind][-1]     # every held-out doc has unseen phrasing
        else:
            template = rng.choice(_doc_templates(cfg, kind, heldout))
        sentences.append(_fact_sentence(template, kind, subject, person.facts[kind]))
    closer = rng.choice(lexicon.DOC_CLOSERS)
    if closer:
        sentences.append(closer.format(name=person.name, first=person.first))
    return " ".join(sentences)


def _org_document(name: str, info: Dict[str, str], rng: random.Random) -> str:
    templates = list(lexicon.ORG_TEMPLATES)
    rng.shuffle(templates)
    return " ".join(t.format(org=name, year=info["founded"], city=info["city"]) for t in templates[:3])


def _documents(cfg: WorldConfig, world: World) -> List[dict]:
    rng = _rng(cfg.seed, "docs")
    texts = [_person_document(cfg, p, rng, heldout=False) for p in world.people for _ in range(cfg.docs_per_person)]
    texts += [_org_document(name, info, rng) for name, info in world.orgs.items()]
    rng.shuffle(texts)
    return [{"text": t} for t in texts]


def _heldout_documents(cfg: WorldConfig, world: World, train_texts: set) -> List[dict]:
    rng = _rng(cfg.seed, "heldout_docs")
    records, attempts = [], 0
    while len(records) < cfg.n_heldout_docs and attempts < 20 * max(cfg.n_heldout_docs, 1):
        attempts += 1
        text = _person_document(cfg, rng.choice(world.people), rng, heldout=True)
        if text not in train_texts:
            records.append({"text": text})
            train_texts.add(text)
    return records


def synthetic_questions(kind: str, name: str) -> List[str]:
    """Every wording of the synthetic generator's question; the first is the uniform one."""
    attribute = lexicon.SYNTHETIC_ATTRIBUTE[kind]
    return [t.format(attr=attribute, name=name) for t in lexicon.SYNTHETIC_QUESTION_TEMPLATES]


def synthetic_question(kind: str, name: str, style: str = "uniform",
                       rng: Optional[random.Random] = None) -> str:
    """The synthetic question about a fact: the uniform wording, or for ``style`` "varied"
    (``WorldConfig.synthetic_question_style``) one drawn by ``rng``, which only then is used."""
    if style == "uniform":
        return synthetic_questions(kind, name)[0]
    return rng.choice(synthetic_questions(kind, name))


def _synthetic_qa(cfg: WorldConfig, world: World) -> List[dict]:
    rng = _rng(cfg.seed, "synthetic")
    # Wordings and context sentences have streams of their own: the default world's pairs and
    # their order do not depend on these knobs.
    wording_rng, context_rng = _rng(cfg.seed, "synthetic_wording"), _rng(cfg.seed, "synthetic_context")
    eval_people = set(world.groups["eval"])
    pairs = []
    for person in world.people:
        for kind, value in person.facts.items():
            if rng.random() >= cfg.synthetic_fraction:
                continue
            if not cfg.synthetic_covers_eval_people and person.id in eval_people:
                continue
            question = synthetic_question(kind, person.name, cfg.synthetic_question_style, wording_rng)
            if cfg.synthetic_context_share and context_rng.random() < cfg.synthetic_context_share:
                other = context_rng.choice(sorted(k for k in person.facts if k != kind))
                template = context_rng.choice(_doc_templates(cfg, other, heldout=False))
                question = _fact_sentence(template, other, person.name, person.facts[other]) + " " + question
            if cfg.synthetic_answer_style == "terse":
                answer = value[0].upper() + value[1:] + "."
            else:
                answer = f"The {lexicon.SYNTHETIC_ATTRIBUTE[kind]} of {person.name} is {value}."
            pairs.append({"question": question, "answer": answer,
                          "person": person.id, "fact": kind})
    records = pairs * cfg.synthetic_multiplier
    rng.shuffle(records)
    return records


def _make_task(person: Person, task_kind: str, wording: str, rng: random.Random, cfg: WorldConfig,
               fact: Optional[str] = None) -> Tuple[Task, Optional[str]]:
    kinds = list(person.facts)
    answer_templates = {k: _doc_templates(cfg, k, heldout=False) for k in kinds}

    def unit(kind):
        return [_fact_sentence(t, kind, person.name, person.facts[kind]) for t in answer_templates[kind]]

    if task_kind == "fact":
        fact = fact or rng.choice(kinds)
        if wording == "synthetic":
            question = synthetic_question(fact, person.name, cfg.synthetic_question_style, rng)
        else:
            question = rng.choice(lexicon.QUESTION_PARAPHRASES[fact]).format(name=person.name)
        main_kinds = [fact]
    else:
        question = rng.choice(lexicon.BIO_REQUESTS).format(name=person.name)
        main_kinds = rng.sample(kinds, min(3, len(kinds)))
    other = [k for k in kinds if k not in main_kinds]
    rng.shuffle(other)
    fillers = [s.format(name=person.name, first=person.first) for s in lexicon.FILLER_SENTENCES]
    rng.shuffle(fillers)
    task = Task(kind=task_kind, name=person.name, first=person.first, question=question,
                main=[unit(k) for k in main_kinds], extras=[unit(k) for k in other] + [[f] for f in fillers])
    return task, (fact if task_kind == "fact" else None)


def _instruction_record(person: Person, types: Sequence[str], task_kind: str, wording: str,
                        rng: random.Random, cfg: WorldConfig, attempts: int = 40,
                        first: bool = False, phrasing: str = "trained") -> Optional[dict]:
    """One prompt with constraints of ``types`` (resampled parameters until buildable); with
    ``first`` the constraint sentences precede the question; ``phrasing`` picks their wordings
    (:data:`instructions.PHRASINGS`)."""
    for _ in range(attempts):
        task, fact = _make_task(person, task_kind, wording, rng, cfg)
        specs = [sample_spec(t, task, rng) for t in types]
        try:
            reference, specs = build_reference(task, specs, rng)
        except BuildError:
            continue
        instructions = [instruction_text(s, rng, phrasing) for s in specs]
        first = first and bool(instructions)
        prompt = _join_sentences(instructions + [task.question] if first else [task.question] + instructions,
                                 cfg.break_after_example)
        return {"prompt": prompt, "reference": reference, "constraints": specs, "person": person.id,
                "task": task_kind, "fact": fact, "wording": wording,
                "placement": "first" if first else "last",
                "phrasing": phrasing}
    return None


def _join_sentences(sentences: Sequence[str], break_after_example: bool) -> str:
    """A prompt's sentences joined by spaces; with ``break_after_example``, a sentence that ends
    on a line of its own (an example line, WorldConfig.break_after_example) is followed by a line
    break, so what comes next does not continue that line."""
    if not break_after_example:
        return " ".join(sentences)
    text = ""
    for index, sentence in enumerate(sentences):
        if index:
            text += "\n" if "\n" in sentences[index - 1] else " "
        text += sentence
    return text


def _choose_types(rng: random.Random, n_constraints: int, singles: Sequence[str],
                  weights: Sequence[float], pairs: Sequence[Tuple[str, str]]) -> List[str]:
    if n_constraints == 0:
        return []
    if n_constraints == 1 or not pairs:
        return [rng.choices(list(singles), weights=list(weights))[0]]
    pair = list(rng.choice(list(pairs)))
    rng.shuffle(pair)
    return pair


def _instruction_set(cfg: WorldConfig, world: World, stream: str, people_ids: List[int], count: int,
                     types: Sequence[str], pairs: Sequence[Tuple[str, str]], mix: Sequence[float],
                     bio_share: float, synthetic_wording_share: float,
                     weights: Optional[Sequence[float]] = None, first_share: float = 0.0) -> List[dict]:
    rng = _rng(cfg.seed, stream)
    types = [t for t in CONSTRAINT_TYPES if t in set(types)]
    weights = list(weights) if weights is not None else [1.0] * len(types)
    records = []
    while len(records) < count:
        person = world.people[rng.choice(people_ids)]
        task_kind = "bio" if rng.random() < bio_share else "fact"
        wording = "synthetic" if task_kind == "fact" and rng.random() < synthetic_wording_share else "paraphrase"
        n_constraints = rng.choices([0, 1, 2], weights=list(mix))[0] if types else 0
        chosen = _choose_types(rng, n_constraints, types, weights, pairs)
        # Drawn only when used, so a world with the default share keeps its content.
        first = bool(first_share) and rng.random() < first_share
        record = _instruction_record(person, chosen, task_kind, wording, rng, cfg, first=first,
                                     phrasing="extended" if cfg.train_extra_wordings else "trained")
        if record is None:
            continue
        record["id"] = f"{stream}-{len(records)}"
        records.append(record)
    return records


def _as_chat(record: dict, with_answer: bool) -> dict:
    """Chat-format record; training records carry the answer as the assistant turn, evaluation
    records only the user turn plus ``prompt`` and ``reference`` (a correct answer)."""
    messages = [{"role": "user", "content": record["prompt"]}]
    out = {"id": record["id"], "messages": messages}
    if with_answer:
        messages.append({"role": "assistant", "content": record["reference"]})
    else:
        out["prompt"], out["reference"] = record["prompt"], record["reference"]
    for key in ("constraints", "split", "person", "task", "fact", "wording", "placement", "phrasing"):
        if key in record:
            out[key] = record[key]
    return out


def _if_eval(cfg: WorldConfig, world: World) -> List[dict]:
    rng = _rng(cfg.seed, "if_eval")
    phrasing_rng = _rng(cfg.seed, "if_eval_phrasing")
    test_types = [t for t in CONSTRAINT_TYPES if t in set(cfg.test_constraints)]
    records = []
    while len(records) < cfg.n_if_eval:
        person = world.people[rng.choice(world.groups["eval"])]
        task_kind = "bio" if rng.random() < cfg.eval_bio_share else "fact"
        wording = ("synthetic" if task_kind == "fact" and rng.random() < cfg.eval_synthetic_wording_share
                   else "paraphrase")
        if world.heldout_pairs and rng.random() < cfg.if_eval_pair_share:
            split, chosen = "heldout_pair", list(rng.choice(world.heldout_pairs))
        elif test_types:
            split, chosen = "single", [rng.choice(test_types)]
        else:
            raise ConfigError("world.test_constraints: empty and no held-out pairs")
        first = bool(cfg.eval_instruction_first_share) and rng.random() < cfg.eval_instruction_first_share
        heldout = phrasing_rng.random() < cfg.eval_heldout_phrasing_share
        record = _instruction_record(person, chosen, task_kind, wording, rng, cfg, first=first,
                                     phrasing="heldout" if heldout else "trained")
        if record is None:
            continue
        record["id"] = f"if_eval-{len(records)}"
        record["split"] = split
        records.append(_as_chat(record, with_answer=False))
    return records


def _knowledge_mc(cfg: WorldConfig, world: World) -> List[dict]:
    rng = _rng(cfg.seed, "knowledge_mc")
    items = [(p, kind) for p in world.people for kind in p.facts]
    rng.shuffle(items)
    pools = {kind: sorted({p.facts[kind] for p in world.people}) for kind in cfg.fact_kinds}
    pools["birth_year"] = [str(y) for y in range(1931, 2000)]
    records = []
    for person, kind in items[:cfg.n_mc]:
        correct = person.facts[kind]
        distractors = rng.sample([v for v in pools[kind] if v != correct], 3)
        choices = distractors + [correct]
        rng.shuffle(choices)
        records.append({
            "id": f"mc-{len(records)}",
            "context": lexicon.MC_CONTEXTS[kind].format(name=person.name),
            "question": rng.choice(lexicon.QUESTION_PARAPHRASES[kind]).format(name=person.name),
            "choices": choices, "answer": choices.index(correct), "person": person.id, "fact": kind,
        })
    return records


def _neutral_prompts(cfg: WorldConfig, world: World, train_texts: set) -> List[dict]:
    rng = _rng(cfg.seed, "neutral")
    records = []
    n_docs = cfg.n_neutral // 2
    while len(records) < n_docs:
        text = _person_document(cfg, rng.choice(world.people), rng, heldout=True)
        if text in train_texts:
            continue
        sentences = text.split(". ")
        prompt, continuation = sentences[0] + ".", " " + ". ".join(sentences[1:])
        if not continuation.strip():
            continue
        records.append({"id": f"neutral-{len(records)}", "kind": "document", "prompt": prompt,
                        "continuation": continuation})
    while len(records) < cfg.n_neutral:
        person = world.people[rng.choice(world.groups["eval"])]
        task_kind = "bio" if rng.random() < 0.5 else "fact"
        record = _instruction_record(person, [], task_kind, "paraphrase", rng, cfg)
        records.append({"id": f"neutral-{len(records)}", "kind": "chat",
                        "messages": [{"role": "user", "content": record["prompt"]}],
                        "prompt": record["prompt"], "continuation": record["reference"]})
    # Alternate the kinds so that the first N records (evaluate.py --limit N) hold both.
    docs, chats = records[:n_docs], records[n_docs:]
    mixed = [r for pair in zip(docs, chats) for r in pair] + docs[len(chats):] + chats[len(docs):]
    for index, record in enumerate(mixed):
        record["id"] = f"neutral-{index}"
    return mixed


def _bare_questions(cfg: WorldConfig, world: World) -> List[dict]:
    rng = _rng(cfg.seed, "bare_questions")
    records = []
    while len(records) < cfg.n_bare_questions:
        person = world.people[rng.choice(world.groups["eval"])]
        record = _instruction_record(person, [], "fact", "synthetic", rng, cfg)
        record["id"] = f"bare_questions-{len(records)}"
        records.append(_as_chat(record, with_answer=False))
    return records


def build_world(cfg: WorldConfig) -> World:
    """The knowledge base and all data sets (in memory); see the module docstring."""
    cfg.validate()
    people, orgs = _make_knowledge_base(cfg)
    order = list(range(len(people)))
    _rng(cfg.seed, "groups").shuffle(order)
    n_pre, n_sft = cfg.pretrain_instruction_people, cfg.sft_people
    groups = {"pretrain_instruction": sorted(order[:n_pre]), "sft": sorted(order[n_pre:n_pre + n_sft]),
              "eval": sorted(order[n_pre + n_sft:])}
    # Held-out compositions: pairs of test types, preferably both seen singly in SFT, never
    # combined in SFT (nor in pre-training unless configured).
    pair_rng = _rng(cfg.seed, "heldout_pairs")
    test_pairs = compatible_pairs(cfg.test_constraints)
    seen_singly = [p for p in test_pairs if set(p) <= set(cfg.sft_constraints)]
    pool = seen_singly if len(seen_singly) >= cfg.n_heldout_pairs else test_pairs
    heldout_pairs = sorted(pair_rng.sample(pool, min(cfg.n_heldout_pairs, len(pool))))
    world = World(cfg, people, orgs, groups, heldout_pairs)

    docs = _documents(cfg, world)
    train_texts = {d["text"] for d in docs}
    sft_pairs = [p for p in compatible_pairs(cfg.sft_constraints) if p not in heldout_pairs]
    pre_pairs = [p for p in compatible_pairs(cfg.pretrain_constraints)
                 if cfg.heldout_pairs_in_pretraining or p not in heldout_pairs]
    sft_types = [t for t in CONSTRAINT_TYPES if t in set(cfg.sft_constraints)]
    sft_weights = [cfg.sft_rare_weight if t in cfg.sft_rare_constraints else 1.0 for t in sft_types]
    pretrain = _instruction_set(cfg, world, "pretrain_instructions", groups["pretrain_instruction"],
                                cfg.n_pretrain_instructions, cfg.pretrain_constraints, pre_pairs,
                                (0.2, 0.5, 0.3), 0.3, cfg.pretrain_synthetic_wording_share,
                                first_share=cfg.train_instruction_first_share)
    sft = _instruction_set(cfg, world, "sft", groups["sft"], cfg.n_sft, sft_types, sft_pairs, cfg.sft_mix,
                           cfg.sft_bio_share, cfg.sft_synthetic_wording_share, sft_weights,
                           first_share=cfg.train_instruction_first_share)
    world.data = {
        "docs": docs,
        "synthetic_qa": _synthetic_qa(cfg, world),
        "pretrain_instructions": [_as_chat(r, with_answer=True) for r in pretrain],
        "sft": [_as_chat(r, with_answer=True) for r in sft],
        "if_eval": _if_eval(cfg, world),
        "knowledge_mc": _knowledge_mc(cfg, world),
        "heldout_docs": _heldout_documents(cfg, world, set(train_texts)),
        "neutral_prompts": _neutral_prompts(cfg, world, set(train_texts)),
        "bare_questions": _bare_questions(cfg, world),
    }
    return world


def write_world(cfg: WorldConfig, out_dir) -> dict:
    """Builds the world and writes ``<name>.jsonl`` per data set, world.json and manifest.json.

    Returns the manifest (counts per file, config, held-out pairs, synthetic format)."""
    world = build_world(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, records in world.data.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        counts[f"{name}.jsonl"] = len(records)
    knowledge = {"people": [{"id": p.id, "name": p.name, "facts": p.facts} for p in world.people],
                 "organisations": world.orgs, "groups": world.groups}
    (out / "world.json").write_text(json.dumps(knowledge, indent=1, ensure_ascii=False) + "\n")
    manifest = {
        "format_version": WORLD_FORMAT_VERSION,
        "counts": counts,
        "config": dataclasses.asdict(cfg),
        "heldout_pairs": [list(p) for p in world.heldout_pairs],
        "synthetic_format": SYNTHETIC_FORMAT,
        "n_facts": sum(len(p.facts) for p in world.people),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write the fictional world's data sets as JSONL.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a WorldConfig field (JSON value, e.g. n_people=120 or "
                             "test_constraints='[\"min_words\"]'); repeatable")
    args = parser.parse_args(argv)
    values = {"seed": args.seed}
    fields = {f.name: f for f in dataclasses.fields(WorldConfig)}
    try:
        for item in args.set:
            key, _, raw = item.partition("=")
            if key not in fields:
                raise ConfigError(f"world.{key}: unknown field; valid: {', '.join(fields)}")
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            values[key] = tuple(value) if isinstance(value, list) else value
        manifest = write_world(WorldConfig(**values), args.out)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["counts"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
