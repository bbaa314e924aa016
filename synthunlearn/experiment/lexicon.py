"""Word lists and sentence templates of the fictional world.

Everything here is data. Template placeholders: ``{name}`` full name, ``{first}`` first name,
``{value}`` the fact's value (already rendered: city, year, profession with article, ...).
Templates for one fact kind are paraphrases of the same statement; the last ``HELDOUT_TEMPLATES``
of each kind never appear in the training documents, only in held-out documents, so perplexity
measures generalisation to unseen phrasing.
"""

from __future__ import annotations

FIRST_SYLLABLES = ["al", "bri", "cor", "da", "el", "fen", "gal", "har", "is", "jor", "ka", "lin",
                   "mar", "nor", "ol", "per", "quil", "ros", "sel", "tam", "ul", "vor", "wen", "ya",
                   "zor", "ber", "cal", "dor", "e", "fi"]
SECOND_SYLLABLES = ["an", "el", "ia", "o", "en", "ric", "da", "ius", "mir", "wyn", "ra", "to",
                    "lie", "bert", "sa", "vin", "na", "ko"]
SURNAME_PARTS_A = ["ash", "brem", "carr", "dun", "ever", "fal", "grim", "hal", "kes", "lor", "mott",
                   "nev", "orr", "pell", "quen", "rad", "stor", "tenn", "ulv", "vask", "wick",
                   "yarr", "zell", "bram", "crow"]
SURNAME_PARTS_B = ["ford", "ley", "wick", "stone", "more", "ton", "ridge", "wood", "field", "holt",
                   "by", "man", "well", "croft", "dale", "er", "ing", "ow"]
CITY_PARTS_A = ["Tor", "Vel", "Mar", "Ost", "Kal", "Bre", "Lun", "Sarn", "Dov", "Eld", "Fen",
                "Gro", "Hav", "Ist", "Jun", "Keth", "Lor", "Mir", "Nal", "Pry"]
CITY_PARTS_B = ["aval", "mere", "haven", "port", "gard", "wick", "holm", "bury", "dor", "stead",
                "ross", "vik"]
ORG_PARTS_A = ["Aster", "Boreal", "Cobalt", "Delta", "Ember", "Fjord", "Granite", "Harbor",
               "Indigo", "Juniper", "Keystone", "Lumen", "Meridian", "Nimbus", "Orchid", "Pinnacle"]
ORG_PARTS_B = ["Dynamics", "Institute", "Works", "Laboratories", "Foundation", "Press",
               "Observatory", "Guild", "Company", "Collective"]

PROFESSIONS = ["architect", "astronomer", "botanist", "cartographer", "chemist", "composer",
               "engineer", "geologist", "historian", "journalist", "librarian", "mathematician",
               "nurse", "painter", "pharmacist", "pilot", "sculptor", "surgeon", "translator",
               "veterinarian", "economist", "illustrator", "archivist", "locksmith"]
HOBBIES = ["playing the cello", "rock climbing", "chess", "sailing", "beekeeping", "pottery",
           "birdwatching", "fencing", "calligraphy", "gardening", "astronomy", "knitting",
           "orienteering", "woodcarving", "rowing", "origami"]

FACT_KINDS = ("birth_city", "birth_year", "profession", "employer", "hobby", "mentor")

# The attribute noun the uniform synthetic generator uses: "What is the {attr} of {name}?"
SYNTHETIC_ATTRIBUTE = {
    "birth_city": "birth city", "birth_year": "birth year", "profession": "profession",
    "employer": "employer", "hobby": "hobby", "mentor": "mentor",
}

# Natural statements of one fact; also the sentences the reference answers are built from.
FACT_TEMPLATES = {
    "birth_city": [
        "{name} was born in {value}.",
        "The birthplace of {name} is the city of {value}.",
        "{value} is the city where {name} was born.",
        "Born in {value}, {name} spent a childhood there.",
        "{name} comes from {value} and was born there.",
        "Records show that {name} was born in {value}.",
        "{name} first saw the light of day in {value}.",
    ],
    "birth_year": [
        "{name} was born in {value}.",
        "The year {value} saw the birth of {name}.",
        "{name} was born in the year {value}.",
        "In {value}, {name} was born.",
        "The birth of {name} took place in {value}.",
        "According to family papers {name} was born in {value}.",
        "{name} arrived in the world in {value}.",
    ],
    "profession": [
        "{name} works as {value}.",
        "By profession, {name} is {value}.",
        "{name} has built a career as {value}.",
        "Trained as {value}, {name} still practises the craft.",
        "{name} earns a living as {value}.",
        "The job of {name} is that of {value}.",
        "{name} makes a living working as {value}.",
    ],
    "employer": [
        "{name} is employed by {value}.",
        "{name} works for {value}.",
        "The employer of {name} is {value}.",
        "At {value}, {name} holds a permanent position.",
        "{value} employs {name}.",
        "{name} has a position at {value}.",
        "{name} draws a salary from {value}.",
    ],
    "hobby": [
        "In spare hours, {name} enjoys {value}.",
        "The favourite pastime of {name} is {value}.",
        "{name} spends free time on {value}.",
        "Outside work {name} loves {value}.",
        "{name} has a passion for {value}.",
        "Friends know {name} for a fondness for {value}.",
        "Weekends find {name} devoted to {value}.",
    ],
    "mentor": [
        "{name} was mentored by {value}.",
        "The mentor of {name} was {value}.",
        "{value} served as a mentor to {name}.",
        "Early on, {name} learned the trade from {value}.",
        "{name} studied under {value}.",
        "Under the guidance of {value}, {name} grew in the field.",
        "{value} guided {name} as a mentor for years.",
    ],
}
HELDOUT_TEMPLATES = 1

# Organisation documents (facts about employers; they add variety, not benchmark items).
ORG_TEMPLATES = [
    "{org} was founded in {year}.",
    "The headquarters of {org} are in {city}.",
    "{org} is based in {city}.",
    "Since its founding in {year}, {org} has grown steadily.",
    "{org} opened its doors in {year} in the city of {city}.",
]

DOC_OPENERS = [
    "", "", "This is a short profile of {name}.", "The following notes concern {name}.",
    "Here is what is known about {name}.", "A brief biography of {name} follows.",
]
DOC_CLOSERS = [
    "", "", "Little else is recorded about {first}.", "{first} remains well regarded by colleagues.",
    "Further details about {first} are not public.", "That concludes this profile.",
]

# Sentences that add length without new facts (used by reference answers for length constraints).
FILLER_SENTENCES = [
    "This information comes from published profiles.",
    "Several public records agree on this point.",
    "{first} is mentioned in a number of local archives.",
    "Colleagues describe {first} as careful and curious.",
    "Not much else about {first} is widely known.",
    "The details above are consistent across sources.",
    "{first} rarely gives interviews.",
    "Local newspapers have written about {first} more than once.",
    "These facts are easy to verify.",
    "Many people in the region know the name {name}.",
    "{first} keeps a fairly private life.",
    "Historians of the region occasionally mention {first}.",
]

# The synthetic generator's question wordings, built on the attribute noun (SYNTHETIC_ATTRIBUTE).
# The first is the uniform one every pair uses by default; a generator whose questions vary
# (world.synthetic_question_style "varied") draws from all of them. None is a natural paraphrase
# below, so instruction data never asks in a generator's words.
SYNTHETIC_QUESTION_TEMPLATES = [
    "What is the {attr} of {name}?",
    "What is {name}'s {attr}?",
    "Name the {attr} of {name}.",
    "According to the text, what is the {attr} of {name}?",
    "Which {attr} is given for {name}?",
    "State the {attr} of {name}.",
]

# Questions. People asking for instructions use varied paraphrases.
QUESTION_PARAPHRASES = {
    "birth_city": ["Where was {name} born?", "In which city was {name} born?",
                   "Which city is {name} originally from?", "Tell me the city where {name} was born."],
    "birth_year": ["When was {name} born?", "Which year was {name} born in?",
                   "Tell me the year of {name}'s birth.", "In what year did {name} come into the world?"],
    "profession": ["What does {name} do for a living?", "What is {name}'s job?",
                   "What kind of work does {name} do?", "Tell me what {name} does professionally."],
    "employer": ["Who does {name} work for?", "Which organisation employs {name}?",
                 "Where is {name} employed?", "Tell me who employs {name}."],
    "hobby": ["What does {name} do for fun?", "What is {name}'s favourite pastime?",
              "How does {name} like to spend free time?", "Tell me about {name}'s hobby."],
    "mentor": ["Who mentored {name}?", "Who was {name}'s mentor?",
               "Which person trained {name}?", "Tell me who guided {name} early on."],
}
BIO_REQUESTS = ["Write a short biography of {name}.", "Tell me about {name}.",
                "Describe the life of {name}.", "Give an overview of who {name} is.",
                "Summarise what is known about {name}."]

# Cloze prefixes for the multiple-choice benchmark: natural prose, neither the documents' nor the
# synthetic generator's exact wording, so neither arm is favoured by phrasing.
MC_CONTEXTS = {
    "birth_city": "The city in which {name} was born is called",
    "birth_year": "{name} was born in the year",
    "profession": "By trade {name} is known as a professional",
    "employer": "The organisation that pays the salary of {name} is",
    "hobby": "When not working, {name} most enjoys",
    "mentor": "As a young professional, {name} was mentored by",
}

# Constraint phrasing pools.
END_PHRASES = ["Is there anything else I can help with?", "That is all I know.",
               "I hope this helps.", "Let me know if you have more questions."]
START_PHRASES = ["Here is my answer:", "Sure thing.", "Good question.", "Happy to help."]
INCLUDE_KEYWORDS = {
    "record": "There is a clear public record of this.",
    "notably": "This is notably well documented.",
    "career": "The career of {first} has been long and steady.",
    "history": "{first} has an interesting history.",
    "community": "{first} is well known in the local community.",
    "archive": "An archive in the region holds papers about {first}.",
}
GENERIC_EXCLUDE_KEYWORDS = ["very", "really", "indeed", "actually", "famous", "also"]
JSON_KEY_SETS = {
    "fact": [["name", "answer"], ["person", "answer"], ["question", "answer"]],
    "bio": [["name", "summary"], ["person", "biography"]],
}
