"""The world: deterministic, facts consistent across renderings, references correct by construction."""

import json
import re

import pytest

from synthunlearn.errors import ConfigError
from synthunlearn.evaluation.constraints import CONSTRAINT_TYPES, check_strict, count_words
from synthunlearn.experiment import lexicon
from synthunlearn.experiment.instructions import compatible, compatible_pairs, instruction_wordings
from synthunlearn.experiment.world import (WorldConfig, build_world, main, synthetic_question, synthetic_questions,
                                          write_world)

SMALL = dict(n_people=40, pretrain_instruction_people=8, sft_people=16, n_pretrain_instructions=40,
             n_sft=120, n_if_eval=60, n_mc=40, n_neutral=10, n_heldout_docs=20, docs_per_person=2)


@pytest.fixture(scope="module")
def world():
    return build_world(WorldConfig(seed=7, **SMALL))


def test_deterministic_from_seed(world):
    again = build_world(WorldConfig(seed=7, **SMALL))
    assert json.dumps(again.data, sort_keys=True) == json.dumps(world.data, sort_keys=True)
    other = build_world(WorldConfig(seed=8, **SMALL))
    assert other.data["docs"] != world.data["docs"]
    assert [p.facts for p in other.people] != [p.facts for p in world.people]


def test_independent_streams(world):
    """Changing one data set's size leaves the others unchanged."""
    bigger = build_world(WorldConfig(seed=7, **{**SMALL, "n_sft": 130}))
    assert bigger.data["docs"] == world.data["docs"]
    assert bigger.data["if_eval"] == world.data["if_eval"]
    assert bigger.data["sft"][:120] == world.data["sft"]


def test_facts_consistent_across_renderings(world):
    people = {p.id: p for p in world.people}
    for pair in world.data["synthetic_qa"]:
        person = people[pair["person"]]
        value = person.facts[pair["fact"]]
        assert pair["question"] == f"What is the {lexicon.SYNTHETIC_ATTRIBUTE[pair['fact']]} of {person.name}?"
        assert pair["answer"].lower() == value.lower() + "."
    for item in world.data["knowledge_mc"]:
        person = people[item["person"]]
        assert len(set(item["choices"])) == 4
        assert item["choices"][item["answer"]] == person.facts[item["fact"]]
        assert person.name in item["context"]
    # Every person document states all of that person's facts.
    by_name = {p.name: p for p in world.people}
    n_person_docs = 0
    for doc in world.data["docs"] + world.data["heldout_docs"]:
        named = [p for name, p in by_name.items() if name in doc["text"]]
        subjects = [p for p in named if all(v in doc["text"] for v in p.facts.values())]
        if named and not any(o in doc["text"] for o in world.orgs if doc["text"].startswith(o)):
            assert subjects, doc["text"]
            n_person_docs += 1
    assert n_person_docs >= len(world.people) * SMALL["docs_per_person"]
    # SFT answers about a fact state its value.
    for record in world.data["sft"]:
        if record["task"] == "fact":
            answer = record["messages"][1]["content"].lower()
            assert people[record["person"]].facts[record["fact"]].lower() in answer


def test_synthetic_format_is_uniform_and_terse(world):
    questions = {re.sub(r" of .*\?$", "", p["question"]) for p in world.data["synthetic_qa"]}
    assert questions == {f"What is the {a}" for a in lexicon.SYNTHETIC_ATTRIBUTE.values()}
    assert max(count_words(p["answer"]) for p in world.data["synthetic_qa"]) <= 3
    assert len(world.data["synthetic_qa"]) == len(world.people) * len(lexicon.FACT_KINDS)
    doubled = build_world(WorldConfig(seed=7, **{**SMALL, "synthetic_multiplier": 2}))
    assert len(doubled.data["synthetic_qa"]) == 2 * len(world.data["synthetic_qa"])


def test_varied_synthetic_questions_with_context(world):
    knobs = {"synthetic_question_style": "varied", "synthetic_context_share": 0.5}
    varied = build_world(WorldConfig(seed=7, **{**SMALL, **knobs}))
    people = {p.id: p for p in varied.people}
    # The same pairs in the same order: only the question's wording (and context) changes.
    assert ([(p["person"], p["fact"], p["answer"]) for p in varied.data["synthetic_qa"]]
            == [(p["person"], p["fact"], p["answer"]) for p in world.data["synthetic_qa"]])
    used, with_context = set(), 0
    for pair in varied.data["synthetic_qa"]:
        person = people[pair["person"]]
        wordings = synthetic_questions(pair["fact"], person.name)
        question = next(w for w in wordings if pair["question"].endswith(w))
        used.add(wordings.index(question))
        context = pair["question"][:-len(question)].strip()
        if context:
            with_context += 1
            # One true sentence about another fact of the same person, not the asked one.
            other = [k for k, v in person.facts.items() if k != pair["fact"] and str(v).lower() in context.lower()]
            assert person.name in context and other and context.endswith("."), pair["question"]
            assert str(person.facts[pair["fact"]]).lower() not in context.lower(), pair["question"]
    assert used == set(range(len(lexicon.SYNTHETIC_QUESTION_TEMPLATES)))
    assert 0.35 < with_context / len(varied.data["synthetic_qa"]) < 0.65
    # Prompts "in the synthetic wording" use the generator's wordings, without context.
    for record in varied.data["bare_questions"] + [r for r in varied.data["if_eval"] if r["wording"] == "synthetic"]:
        name = people[record["person"]].name
        assert any(w in record["prompt"] for w in synthetic_questions(record["fact"], name)), record["prompt"]
    # Training instructions never ask in a generator's words.
    for record in varied.data["sft"] + varied.data["pretrain_instructions"]:
        if record["task"] == "fact" and record["wording"] == "paraphrase":
            name = people[record["person"]].name
            assert not any(w in record["messages"][0]["content"] for w in synthetic_questions(record["fact"], name))
    # Without the evaluation people the generator writes exactly the other pairs (shuffled anew).
    narrow = build_world(WorldConfig(seed=7, **{**SMALL, "synthetic_covers_eval_people": False}))
    eval_people = set(world.groups["eval"])
    assert (sorted(json.dumps(p, sort_keys=True) for p in narrow.data["synthetic_qa"])
            == sorted(json.dumps(p, sort_keys=True) for p in world.data["synthetic_qa"] if p["person"] not in eval_people))
    assert len(narrow.data["synthetic_qa"]) < len(world.data["synthetic_qa"])
    assert {r["person"] for r in narrow.data["if_eval"] + narrow.data["bare_questions"]} <= eval_people
    for name in ("if_eval", "bare_questions", "sft", "pretrain_instructions", "knowledge_mc"):
        assert narrow.data[name] == world.data[name], name
    for key, value in (("synthetic_question_style", "mixed"), ("synthetic_context_share", 2.0)):
        with pytest.raises(ConfigError, match=key):
            build_world(WorldConfig(**{**SMALL, key: value}))


@pytest.mark.parametrize("name", ["sft", "pretrain_instructions"])
def test_training_references_satisfy_their_constraints(world, name):
    for record in world.data[name]:
        user, assistant = record["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        for spec in record["constraints"]:
            assert check_strict(assistant["content"], spec), (spec, assistant["content"])


def test_eval_references_satisfy_constraints_and_are_held_out(world):
    sft_people = set(world.groups["sft"])
    sft_pairs = {tuple(sorted(s["type"] for s in r["constraints"])) for r in world.data["sft"]
                 if len(r["constraints"]) == 2}
    heldout = {tuple(p) for p in world.heldout_pairs}
    assert heldout and not (heldout & sft_pairs)
    splits = set()
    for record in world.data["if_eval"]:
        assert record["person"] not in sft_people                      # unseen person-fact combinations
        assert len(record["messages"]) == 1 and record["messages"][0]["content"] == record["prompt"]
        for spec in record["constraints"]:
            assert check_strict(record["reference"], spec), (spec, record["reference"])
        types = tuple(sorted(s["type"] for s in record["constraints"]))
        if record["split"] == "heldout_pair":
            assert types in heldout
        else:
            assert len(types) == 1
        splits.add(record["split"])
    assert splits == {"single", "heldout_pair"}


def test_length_constraints_conflict_with_terse_answers(world):
    long_refs = [r["reference"] for r in world.data["if_eval"]
                 if any(s["type"] in ("min_words", "min_sentences") for s in r["constraints"])]
    assert long_refs and min(count_words(r) for r in long_refs) > 10


def test_constraint_sets_per_stage_are_respected():
    cfg = WorldConfig(seed=1, **{**SMALL, "sft_constraints": ("lowercase", "quoted", "min_words"),
                                 "test_constraints": ("lowercase", "quoted", "no_commas"),
                                 "pretrain_constraints": ("uppercase",), "n_heldout_pairs": 1})
    world = build_world(cfg)
    assert {s["type"] for r in world.data["sft"] for s in r["constraints"]} <= set(cfg.sft_constraints)
    assert {s["type"] for r in world.data["if_eval"] for s in r["constraints"]} <= set(cfg.test_constraints)
    assert {s["type"] for r in world.data["pretrain_instructions"] for s in r["constraints"]} <= {"uppercase"}


def test_constraint_placement(world):
    # Default: every constraint sentence follows the question.
    for name in ("sft", "if_eval", "pretrain_instructions"):
        assert {r["placement"] for r in world.data[name]} == {"last"}
    placed = build_world(WorldConfig(seed=7, **{**SMALL, "train_instruction_first_share": 0.5,
                                                "eval_instruction_first_share": 1.0}))
    checked = 0
    for record in placed.data["if_eval"]:
        prompt = record["prompt"]
        assert record["placement"] == "first", prompt
        if record["wording"] == "synthetic":   # the synthetic question itself closes the prompt
            question = synthetic_question(record["fact"], placed.people[record["person"]].name)
            assert prompt.endswith(" " + question), prompt
            checked += 1
        for spec in record["constraints"]:
            assert check_strict(record["reference"], spec), (spec, record["reference"])
    assert checked > 5
    sft = [r for r in placed.data["sft"] if r["constraints"]]
    first = [r for r in sft if r["placement"] == "first"]
    assert 0.3 < len(first) / len(sft) < 0.7
    for record in first:
        prompt = record["messages"][0]["content"]
        assert prompt.rstrip().endswith(("?", ".")) and not prompt.startswith(("What", "Tell", "Who", "Where"))
    # Unconstrained prompts have nothing to move.
    assert all(r["placement"] == "last" for r in placed.data["sft"] if not r["constraints"])
    with pytest.raises(ConfigError, match="eval_instruction_first_share"):
        build_world(WorldConfig(**{**SMALL, "eval_instruction_first_share": 1.5}))


def test_heldout_phrasing(world):
    # Default: every evaluation prompt words its constraints as the training sets do.
    assert {r["phrasing"] for r in world.data["if_eval"]} == {"trained"}
    mixed = build_world(WorldConfig(seed=7, **{**SMALL, "eval_heldout_phrasing_share": 0.5}))
    trained_sentences = set()
    for name in ("sft", "pretrain_instructions"):
        # Training sets never use a held-out wording, whatever the share.
        assert mixed.data[name] == world.data[name]
        for record in mixed.data[name]:
            trained_sentences.update(w for spec in record["constraints"] for w in instruction_wordings(spec))
            for spec in record["constraints"]:
                assert not any(w in record["messages"][0]["content"]
                               for w in instruction_wordings(spec, "heldout"))
    heldout = 0
    for old, new in zip(world.data["if_eval"], mixed.data["if_eval"]):
        # The same people, facts, constraints and references: only the wording may change.
        for key in ("id", "person", "fact", "constraints", "reference", "placement", "wording"):
            assert old[key] == new[key], key
        if new["phrasing"] == "trained":
            assert new["prompt"] == old["prompt"]
            continue
        heldout += 1
        for spec in new["constraints"]:
            assert any(w in new["prompt"] for w in instruction_wordings(spec, "heldout")), new["prompt"]
            assert not any(w in new["prompt"] for w in instruction_wordings(spec)), new["prompt"]
        assert not any(w in new["prompt"] for w in trained_sentences), new["prompt"]
    assert 0.3 < heldout / len(world.data["if_eval"]) < 0.7
    with pytest.raises(ConfigError, match="eval_heldout_phrasing_share"):
        build_world(WorldConfig(**{**SMALL, "eval_heldout_phrasing_share": -0.1}))


def test_extra_training_wordings(world):
    diverse = build_world(WorldConfig(seed=7, **{**SMALL, "train_extra_wordings": True}))
    # Evaluation is untouched: the same prompts, worded with the first two training wordings.
    assert diverse.data["if_eval"] == world.data["if_eval"]
    assert {r["phrasing"] for r in diverse.data["sft"] + diverse.data["pretrain_instructions"]} == {"extended"}
    seen, counts = {}, {}
    for name in ("sft", "pretrain_instructions"):
        for record in diverse.data[name]:
            prompt = record["messages"][0]["content"]
            for spec in record["constraints"]:
                used = [w for w in instruction_wordings(spec, "extended") if w in prompt]
                assert used, (spec, prompt)
                assert not any(w in prompt for w in instruction_wordings(spec, "heldout"))
                seen.setdefault(spec["type"], set()).update(
                    i for i, w in enumerate(instruction_wordings(spec, "extended")) if w in used)
                counts[spec["type"]] = counts.get(spec["type"], 0) + 1
    # Every type that occurs often enough is taught with more than its two default wordings.
    common = [t for t, n in counts.items() if n >= 6]
    assert len(common) >= 10 and all(len(seen[t]) > 2 for t in common), (seen, counts)


def _prompts(world, name):
    return [r["prompt"] if "prompt" in r else r["messages"][0]["content"] for r in world.data[name]]


EXAMPLE_LINE = "such as:\n* This is a point."   # bullet_list's first wording ends with it


def test_break_after_example():
    # Default: the layout of the worlds written before the knob, where what follows the example
    # bullet continues its line.
    knobs = {**SMALL, "n_sft": 300, "n_pretrain_instructions": 200, "n_if_eval": 200,
             "train_instruction_first_share": 0.5, "eval_instruction_first_share": 0.5}
    before = build_world(WorldConfig(seed=7, **knobs))
    glued = [p for name in ("sft", "pretrain_instructions", "if_eval") for p in _prompts(before, name)
             if EXAMPLE_LINE + " " in p]
    assert len(glued) >= 10
    broken = build_world(WorldConfig(seed=7, **{**knobs, "break_after_example": True}))
    changed = 0
    for name in before.data:
        assert len(broken.data[name]) == len(before.data[name]), name
        for old, new in zip(before.data[name], broken.data[name]):
            if new == old:
                continue
            # The same records (the knob draws no random numbers): only the break differs.
            changed += 1
            assert json.dumps(new).replace(json.dumps(EXAMPLE_LINE + "\n")[1:-1], json.dumps(EXAMPLE_LINE + " ")[1:-1]) \
                == json.dumps(old), (old, new)
    assert changed >= len(glued)
    for name in ("sft", "pretrain_instructions", "if_eval"):
        for prompt in _prompts(broken, name):
            assert EXAMPLE_LINE + " " not in prompt, prompt
            if EXAMPLE_LINE in prompt and not prompt.endswith(EXAMPLE_LINE):
                assert EXAMPLE_LINE + "\n" in prompt, prompt
    # Constraints first: the question starts a line of its own, after the example.
    assert any(record["placement"] == "first" and EXAMPLE_LINE + "\n" in prompt
               for name in ("sft", "if_eval") for record, prompt in zip(broken.data[name], _prompts(broken, name)))


def _synthetic_worded(world, name):
    """Records of a set whose question is the synthetic wording of its person and fact."""
    return [r for r in world.data[name] if r["task"] == "fact" and r["wording"] == "synthetic"
            and synthetic_question(r["fact"], world.people[r["person"]].name) in r["messages"][0]["content"]]


def test_pretrain_synthetic_wording_share(world):
    # Default: half the base's fact questions use the synthetic wording, constrained ones included.
    worded = _synthetic_worded(world, "pretrain_instructions")
    facts = [r for r in world.data["pretrain_instructions"] if r["task"] == "fact"]
    assert 0.3 < len(worded) / len(facts) < 0.7 and any(r["constraints"] for r in worded)
    # At 0 the synthetic wording reaches training only through the synthetic Q-A; the other sets
    # (and the random streams they are drawn from) are untouched.
    unseen = build_world(WorldConfig(seed=7, **{**SMALL, "pretrain_synthetic_wording_share": 0.0}))
    assert not _synthetic_worded(unseen, "pretrain_instructions")
    assert {r["wording"] for r in unseen.data["pretrain_instructions"]} == {"paraphrase"}
    for name in ("sft", "if_eval", "synthetic_qa", "bare_questions", "docs", "knowledge_mc"):
        assert unseen.data[name] == world.data[name], name
    assert len(unseen.data["pretrain_instructions"]) == len(world.data["pretrain_instructions"])
    with pytest.raises(ConfigError, match="pretrain_synthetic_wording_share"):
        build_world(WorldConfig(**{**SMALL, "pretrain_synthetic_wording_share": 1.5}))


def test_bare_questions(world):
    from synthunlearn.evaluation.pattern import is_terse

    records = world.data["bare_questions"]
    assert len(records) == 80
    eval_people = set(world.groups["eval"])
    for record in records:
        name = world.people[record["person"]].name
        assert record["person"] in eval_people and not record["constraints"]
        assert record["messages"] == [{"role": "user", "content": synthetic_question(record["fact"], name)}]
        assert not is_terse(record["reference"]) and name in record["reference"]
    # SFT teaches a full sentence for an unconstrained question: none of its answers is terse.
    unconstrained = [r["messages"][1]["content"] for r in world.data["sft"] if not r["constraints"]]
    assert unconstrained and not any(is_terse(a) for a in unconstrained)


def test_rare_constraints_are_rare():
    cfg = WorldConfig(seed=1, **{**SMALL, "n_sft": 300, "sft_rare_constraints": ("min_words",),
                                 "sft_rare_weight": 0.05, "sft_mix": (0.0, 1.0, 0.0)})
    counts = [s["type"] for r in build_world(cfg).data["sft"] for s in r["constraints"]]
    assert counts.count("min_words") < counts.count("lowercase") / 3


def test_heldout_documents_are_new(world):
    train = {d["text"] for d in world.data["docs"]}
    assert world.data["heldout_docs"] and not any(d["text"] in train for d in world.data["heldout_docs"])
    reserved = [lexicon.FACT_TEMPLATES[k][-1].split("{")[0] for k in lexicon.FACT_KINDS]
    assert not any(r and r in d["text"] for d in world.data["docs"] for r in reserved if len(r) > 8)
    kinds = [r["kind"] for r in world.data["neutral_prompts"]]
    assert set(kinds[:2]) == {"document", "chat"}     # interleaved, so --limit keeps both kinds
    for record in world.data["neutral_prompts"]:
        assert record["continuation"].strip()
        assert "Question:" not in record["continuation"] and "Answer:" not in record["continuation"]


def test_compatibility_is_symmetric_and_excludes_clashes():
    assert not compatible("uppercase", "lowercase") and not compatible("json_keys", "quoted")
    for a in CONSTRAINT_TYPES:
        for b in CONSTRAINT_TYPES:
            assert compatible(a, b) == compatible(b, a)
    assert ("lowercase", "no_commas") in compatible_pairs(CONSTRAINT_TYPES)


def test_validation_errors():
    with pytest.raises(ConfigError, match="sft_constraints"):
        build_world(WorldConfig(sft_constraints=("rhymes",)))
    with pytest.raises(ConfigError, match="n_people"):
        build_world(WorldConfig(n_people=100, sft_people=90, pretrain_instruction_people=8))


def test_write_world_and_cli(tmp_path, capsys):
    manifest = write_world(WorldConfig(seed=2, **SMALL), tmp_path / "a")
    for name, count in manifest["counts"].items():
        lines = (tmp_path / "a" / name).read_text().splitlines()
        assert len(lines) == count and all(json.loads(line) for line in lines)
    assert manifest["synthetic_format"] == "Question: {question}\nAnswer: {answer}"
    assert set(manifest["counts"]) >= {"docs.jsonl", "synthetic_qa.jsonl", "sft.jsonl", "if_eval.jsonl",
                                       "knowledge_mc.jsonl", "heldout_docs.jsonl", "neutral_prompts.jsonl"}
    assert json.loads((tmp_path / "a" / "world.json").read_text())["people"]
    args = ["--out", str(tmp_path / "b"), "--seed", "2"] + [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
    assert main(args) == 0
    for name in manifest["counts"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main(["--out", str(tmp_path / "c"), "--set", "nonsense=1"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_default_world_builds():
    world = build_world(WorldConfig())
    assert len(world.data["sft"]) == WorldConfig.n_sft and len(world.data["if_eval"]) == WorldConfig.n_if_eval
    used = {s["type"] for r in world.data["if_eval"] for s in r["constraints"]}
    assert used == set(CONSTRAINT_TYPES)
