"""Generate the bundled tiny data set (deterministic; its outputs are committed next to it).

    python synthunlearn/assets/tiny/make_tiny_data.py            # rewrites the *.jsonl files here

A small fictional world: ``N_PEOPLE`` people, each with four facts (birth city, birth year,
profession, employer). People ``0 .. N_TRAIN-1`` feed the training files, the rest the ``*_eval``
files, so held-out evaluation is about people never trained on.

Files (one JSON object per line, UTF-8):

- ``forget.jsonl`` / ``forget_eval.jsonl``: the *synthetic* Q-A pairs, ONE uniform format,
  records ``{"question": str, "answer": str}``; the question wording is fixed per fact and the
  answer is the bare value ending in a full stop. This uniformity is the pattern unlearning removes.
- ``replay.jsonl`` / ``replay_eval.jsonl``: natural prose documents ``{"text": str}`` stating the
  same facts in varied wording (biographies from several templates, plus city descriptions).
- ``sft.jsonl`` / ``sft_eval.jsonl``: instruction following with simple verifiable format
  constraints (JSON with a given key, quoted answer, two-item bullet list, fixed prefix, fixed
  suffix, full sentence naming the person) plus a few world-independent tasks. Mostly chat
  records ``{"messages": [{"role", "content"}, ...]}`` (some with a system turn, some with two
  user/assistant exchanges); the rest ``{"prompt": str, "response": str}`` records, mixed in
  the same file. A file with a ``messages`` column is formatted as chat; its records whose
  ``messages`` is null must have ``prompt``/``response`` and become one user/assistant exchange
  (see synthunlearn/data/formatting.py).

The tokenizer of ``builtin:tiny-llama`` is trained on the union of these files' strings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
N_PEOPLE = 80
N_TRAIN = 64
HERE = Path(__file__).resolve().parent

FIRST = ["Alira", "Bexan", "Corvin", "Dalia", "Edrin", "Fenna", "Garrow", "Hesper", "Ilvan", "Jorah",
         "Kesra", "Lomir", "Maelis", "Nerith", "Orrin", "Pella", "Quill", "Rosmer", "Sabeth", "Tarran",
         "Ulwen", "Veyra", "Wendal", "Ysolde"]
LAST = ["Venhold", "Ashgrove", "Bramwick", "Corlane", "Dunmere", "Elsworth", "Farrowby", "Greythorn",
        "Halloway", "Ivesby", "Kettleburn", "Larkspur", "Morrow", "Nettlefield", "Oakhurst", "Pendry"]
CITIES = ["Port Ardel", "Sennick", "Marrowvale", "Tollbridge", "Caskmoor", "Elmsreach", "Harrowgate",
          "Quennel", "Vastry", "Wyndle", "Brisk Hollow", "Lanterly"]
CITY_TRAITS = {
    "Port Ardel": "a harbour town known for its grey stone quays",
    "Sennick": "a river city famous for its seven bridges",
    "Marrowvale": "a farming town surrounded by barley fields",
    "Tollbridge": "a market town built around an old toll gate",
    "Caskmoor": "a windy moorland town with many breweries",
    "Elmsreach": "a quiet town at the edge of a great elm forest",
    "Harrowgate": "a walled city with a famous clock tower",
    "Quennel": "a mountain village reached by a single road",
    "Vastry": "a busy port where ships unload spices",
    "Wyndle": "a canal town full of narrow boats",
    "Brisk Hollow": "a valley town with cold clear springs",
    "Lanterly": "a hill city lit by thousands of lamps at night",
}
PROFESSIONS = ["glassblower", "cartographer", "clockmaker", "botanist", "shipwright", "bookbinder",
               "astronomer", "weaver", "apothecary", "stonemason", "archivist", "beekeeper"]
EMPLOYERS = ["the Tallow Guild", "Brightwater Mills", "the Royal Survey", "Copperfield Works",
             "the Lantern Society", "Harbourline Shipping", "the Greenhouse Trust", "Ironleaf Press",
             "the Northern Observatory", "Meadowford Dyeworks"]

# The synthetic Q-A wording: fixed per fact (the "uniform format").
QA_QUESTIONS = {
    "city": "Where was {name} born?",
    "year": "In which year was {name} born?",
    "profession": "What is the profession of {name}?",
    "employer": "Who employs {name}?",
}

BIO_TEMPLATES = [
    "{name} was born in {city} in {year}. Trained as {a_profession}, {first} later joined {employer}, "
    "where colleagues still speak of the careful work done there.",
    "Born in {year} in the town of {city}, {name} grew up watching the local craftspeople. "
    "Today {first} works as {a_profession} for {employer}.",
    "The {profession} {name} comes from {city}. {first} was born there in {year} and has been "
    "employed by {employer} for many years.",
    "Among the people of {city}, {name} is well known. Since being born in {year}, {first} has "
    "become a respected {profession}, and {employer} counts {first} among its most loyal staff.",
    "{employer} hired {name} as {a_profession} after {first} left {city}, the town where {first} "
    "had been born in {year}.",
    "If you ask about {name}, people will tell you three things: {first} was born in {city}, "
    "the year was {year}, and {first} earns a living as {a_profession} at {employer}.",
]

# SFT questions are paraphrased (not the synthetic wording).
SFT_ASK = {
    "city": ["Tell me the birthplace of {name}.", "In what town did {name} come into the world?",
             "Which city is {name} originally from?"],
    "year": ["When was {name} born? Give the year.", "Tell me the birth year of {name}.",
             "What year did {name} come into the world?"],
    "profession": ["What does {name} do for a living?", "Tell me the job of {name}.",
                   "Which trade does {name} practise?"],
    "employer": ["Where does {name} work?", "Name the employer of {name}.",
                 "For which organisation does {name} work?"],
}
FACT_WORD = {"city": "city", "year": "year", "profession": "profession", "employer": "employer"}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You answer briefly and follow the format exactly.",
                  "You are a careful assistant who follows every instruction."]


def make_people(rng: random.Random) -> list[dict]:
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)
    people = []
    for name in names[:N_PEOPLE]:
        people.append({
            "name": name,
            "first": name.split()[0],
            "city": rng.choice(CITIES),
            "year": str(rng.randint(1820, 1899)),
            "profession": rng.choice(PROFESSIONS),
            "employer": rng.choice(EMPLOYERS),
        })
    return people


def qa_records(people):
    out = []
    for p in people:
        for fact, q in QA_QUESTIONS.items():
            out.append({"question": q.format(**p), "answer": f"{p[fact]}."})
    return out


def prose_records(people, rng, per_person):
    out = []
    for p in people:
        for t in rng.sample(BIO_TEMPLATES, per_person):
            text = t.format(a_profession=f"{article(p['profession'])} {p['profession']}", **p)
            out.append({"text": text[0].upper() + text[1:]})
    return out


def city_records():
    out = []
    for city, trait in CITY_TRAITS.items():
        out.append({"text": f"{city} is {trait}. Travellers who visit {city} often stay longer than "
                            f"they planned, and many of its people work in crafts and trade."})
    return out


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def constrained(p, fact, rng) -> tuple[str, str]:
    """One (instruction, response) pair with a verifiable format constraint."""
    ask = rng.choice(SFT_ASK[fact]).format(**p)
    value = p[fact]
    kind = rng.randrange(6)
    if kind == 0:
        key = FACT_WORD[fact]
        return f'{ask} Reply in JSON with the key "{key}".', json.dumps({key: value})
    if kind == 1:
        return f"{ask} Put your answer in double quotes.", f'"{value}"'
    if kind == 2:
        other = rng.choice([f for f in SFT_ASK if f != fact])
        return (f"Give the {FACT_WORD[fact]} and the {FACT_WORD[other]} of {p['name']} as a bullet "
                f"list with exactly two items.", f"- {value}\n- {p[other]}")
    if kind == 3:
        return f'{ask} Begin your answer with "Answer:".', f"Answer: {value}"
    if kind == 4:
        return f'{ask} End your answer with the word "Done".', f"{value}. Done"
    sentences = {
        "city": f"{p['name']} was born in {value}.",
        "year": f"{p['name']} was born in the year {value}.",
        "profession": f"{p['name']} works as {article(value)} {value}.",
        "employer": f"{p['name']} works for {value}.",
    }
    return f"{ask} Answer in one full sentence that mentions {p['name']}.", sentences[fact]


NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]


def generic_task(rng) -> tuple[str, str]:
    """A world-independent instruction, so SFT is not only about the fictional facts."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(0, 6), rng.randint(0, 6)
        return f"What is {a} plus {b}? Answer with only the number.", str(a + b)
    if kind == 1:
        n = rng.randint(0, 12)
        return f"Write the number {n} in words, in lower case.", NUMBER_WORDS[n]
    if kind == 2:
        word = rng.choice(COLOURS + PROFESSIONS)
        k = rng.randint(2, 4)
        return f'Repeat the word "{word}" {k} times, separated by spaces.', " ".join([word] * k)
    cols = rng.sample(COLOURS, 3)
    return ("List three colours as a bullet list.", "\n".join(f"- {c}" for c in cols))


def sft_records(people, rng, n_chat, n_pr):
    chats, pairs = [], []
    facts = list(SFT_ASK)

    def one_pair():
        if rng.random() < 0.2:
            return generic_task(rng)
        return constrained(rng.choice(people), rng.choice(facts), rng)

    for _ in range(n_chat):
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for _ in range(2 if rng.random() < 0.25 else 1):
            q, a = one_pair()
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        chats.append({"messages": messages})
    for _ in range(n_pr):
        q, a = one_pair()
        pairs.append({"prompt": q, "response": a})
    return chats, pairs


def write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(out_dir: Path = HERE) -> None:
    rng = random.Random(SEED)
    people = make_people(rng)
    train, held = people[:N_TRAIN], people[N_TRAIN:]
    files = {
        "forget.jsonl": qa_records(train),
        "forget_eval.jsonl": qa_records(held),
        "replay.jsonl": prose_records(train, rng, 3) + city_records(),
        "replay_eval.jsonl": prose_records(held, rng, 2),
    }
    sft_chat, sft_pr = sft_records(train, rng, 300, 100)
    eval_chat, eval_pr = sft_records(held, rng, 48, 16)
    files["sft.jsonl"] = sft_chat + sft_pr
    files["sft_eval.jsonl"] = eval_chat + eval_pr
    rng.shuffle(files["sft.jsonl"])
    rng.shuffle(files["sft_eval.jsonl"])
    for name, records in files.items():
        write_jsonl(out_dir / name, records)


if __name__ == "__main__":
    main()
