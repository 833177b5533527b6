"""RULER's synthetic tasks (Hsieh et al., 2024), generated offline and seeded, on a compressed KV cache.

The paper (ADAKV_SPEC 5) runs RULER 4K on Llama-3.1-8B with 50% / 30% of the cache kept, question-aware
and question-agnostic. This script regenerates 11 of RULER's 13 tasks without any download:
niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe. qa_1 / qa_2 are
skipped: they need SQuAD / HotpotQA. Templates, needle formats, value types, haystack kinds and the
string-match scoring follow NVIDIA/RULER (scripts/data/synthetic/*.py, constants.py, synthetic.yaml),
written from knowledge of that repository; the differences are listed in DEVIATIONS below.

A prompt is: chat template around [task instruction + haystack] + [the final query sentence], then
RULER's answer prefix opens the assistant turn. Question-aware: the whole prompt is prefilled and
compressed (the query sits in the observation window). Question-agnostic: the context part (chat head +
instruction + haystack) is prefilled and compressed alone, then the query sentence + chat tail + answer
prefix is appended to the compressed cache. Both modes see the same token ids.

Speed (CPU): one capture per batch of samples and mode (the whole prompts; the contexts alone) serves
every press (experiments/common.py: model.run_prefill with a CaptureTap, then model.cache_from_capture per
press); question-agnostic caches take the question through model.append; each configuration's batch is
decoded by the library's decode loop, stopping at EOS. Every result records the cache's memory (allocated,
kept, decode room).

    python -m experiments.ruler --lengths 1024 --samples 5 --short-gen   # the CPU grid (~15 min, 2 cores)
    python -m experiments.ruler --quick                                   # smoke run
    python -m experiments.ruler --replot
"""

from __future__ import annotations

import argparse
import math
import random
import re
import string
import sys
import time
import uuid

import jax
import numpy as np

from experiments import common, metrics

DEVIATIONS = [
  "essay haystack: Python's pydoc_data.topics text instead of Paul Graham's essays (no download); "
  "it differs between Python versions, so the exact haystack depends on sys.version (recorded)",
  "key words: adjective-noun pairs from a built-in list instead of the wonderwords package; cwe draws "
  "its words from the pydoc text's vocabulary",
  "sentence split of the essay haystack: a regex instead of nltk's sent_tokenize",
  "vt / fwe few-shot examples are short (a few noise lines / a 10-word vocabulary); RULER's vt example "
  "may fill up to 500 tokens, which would leave little room at 1K",
  "distractor and target keys are drawn distinct (RULER does not enforce it)",
  "with --short-gen the number of generated tokens is capped per task near the answer's length "
  "(the context is still sized with RULER's tokens_to_generate)",
  "chat template: the model's own; RULER's answer prefix opens the assistant turn (leading space stripped)",
]

# ---- RULER's task definitions (synthetic.yaml, constants.py) ---------------------------------------

TASKS = {
  "niah_single_1": dict(kind="niah", haystack="noise", key="words", value="numbers", k=1, v=1, q=1),
  "niah_single_2": dict(kind="niah", haystack="essay", key="words", value="numbers", k=1, v=1, q=1),
  "niah_single_3": dict(kind="niah", haystack="essay", key="words", value="uuids", k=1, v=1, q=1),
  "niah_multikey_1": dict(kind="niah", haystack="essay", key="words", value="numbers", k=4, v=1, q=1),
  "niah_multikey_2": dict(kind="niah", haystack="needle", key="words", value="numbers", k=1, v=1, q=1),
  "niah_multikey_3": dict(kind="niah", haystack="needle", key="uuids", value="uuids", k=1, v=1, q=1),
  "niah_multivalue": dict(kind="niah", haystack="essay", key="words", value="numbers", k=1, v=4, q=1),
  "niah_multiquery": dict(kind="niah", haystack="essay", key="words", value="numbers", k=4, v=1, q=4),
  "vt": dict(kind="vt", chains=1, hops=4),
  "cwe": dict(kind="cwe", freq_cw=30, freq_ucw=3, num_cw=10),
  "fwe": dict(kind="fwe", alpha=2.0, coded_wordlen=6, vocab_size=2000),
}
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
# --short-gen: about the answer's length in SmolLM2 tokens plus a margin (a 7-digit number is 9 tokens
# with its period, a uuid 37, "1. word" about 4); the context is sized with RULER's numbers regardless.
SHORT_GEN = {
  "niah_single_1": 16,
  "niah_single_2": 16,
  "niah_single_3": 48,
  "niah_multikey_1": 16,
  "niah_multikey_2": 16,
  "niah_multikey_3": 48,
  "niah_multivalue": 56,
  "niah_multiquery": 64,
  "vt": 30,
  "cwe": 56,
  "fwe": 24,
}

TEMPLATES = {
  "niah": (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to "
    "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all "
    "the special magic {type_needle_v} for {query} mentioned in the provided text?"
  ),
  "vt": (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."
  ),
  "cwe": (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
    "words in the above list?"
  ),
  "fwe": (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text?"
  ),
}
ANSWER_PREFIXES = {
  "niah": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
  # "assgined" is RULER's spelling
  "vt": (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assgined the value {query}, they are: "
  ),
  "cwe": " Answer: The top 10 words that appear most often in the list are:",
  "fwe": " Answer: According to the coded text above, the three most frequently appeared words are:",
}
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40))

ADJECTIVES = [
  "abundant",
  "adorable",
  "agreeable",
  "alive",
  "ancient",
  "angry",
  "anxious",
  "aquatic",
  "arrogant",
  "ashamed",
  "awful",
  "bashful",
  "bewildered",
  "bitter",
  "black",
  "blue",
  "bored",
  "brave",
  "breezy",
  "bright",
  "broad",
  "broken",
  "bumpy",
  "busy",
  "calm",
  "careful",
  "cheerful",
  "chilly",
  "clean",
  "clever",
  "cloudy",
  "clumsy",
  "colossal",
  "cool",
  "crazy",
  "creepy",
  "crooked",
  "crowded",
  "cruel",
  "curious",
  "curly",
  "cynical",
  "damp",
  "dazzling",
  "deep",
  "defiant",
  "delightful",
  "dizzy",
  "drab",
  "dry",
  "dusty",
  "eager",
  "early",
  "elated",
  "elegant",
  "empty",
  "enchanting",
  "energetic",
  "enormous",
  "envious",
  "evil",
  "excited",
  "fair",
  "faithful",
  "famous",
  "fancy",
  "fierce",
  "filthy",
  "flaky",
  "fluffy",
  "foolish",
  "fragile",
  "frail",
  "frantic",
  "fresh",
  "friendly",
  "frightened",
  "funny",
  "fuzzy",
  "gentle",
  "giant",
  "gifted",
  "glamorous",
  "gleaming",
  "glorious",
  "gorgeous",
  "graceful",
  "greasy",
  "great",
  "green",
  "grumpy",
  "handsome",
  "happy",
  "harsh",
  "healthy",
  "heavy",
  "helpful",
  "helpless",
  "hollow",
  "homely",
  "huge",
  "hungry",
  "icy",
  "itchy",
  "jealous",
  "jittery",
  "jolly",
  "juicy",
  "kind",
  "large",
  "lazy",
  "light",
  "little",
  "lively",
  "lonely",
  "long",
  "loud",
  "lovely",
  "lucky",
  "magnificent",
  "mellow",
  "melodic",
  "misty",
  "modern",
  "mushy",
  "mysterious",
  "narrow",
  "nasty",
  "naughty",
  "nervous",
  "nice",
  "noisy",
  "numerous",
  "nutty",
  "obedient",
  "odd",
  "old",
  "orange",
  "panicky",
  "perfect",
  "plain",
  "pleasant",
  "polite",
  "powerful",
  "precious",
  "prickly",
  "proud",
  "puzzled",
  "quaint",
  "quick",
  "quiet",
  "rapid",
  "rare",
  "raspy",
  "red",
  "rich",
  "ripe",
  "rotten",
  "rough",
  "round",
  "rusty",
  "salty",
  "scary",
  "scrawny",
  "selfish",
  "shaggy",
  "shaky",
  "shallow",
  "sharp",
  "shiny",
  "short",
  "shy",
  "silent",
  "silky",
  "silly",
  "skinny",
  "slimy",
  "slippery",
  "small",
  "smooth",
  "soft",
  "sour",
  "sparkling",
  "spicy",
  "splendid",
  "spotty",
  "square",
  "steady",
  "sticky",
  "stormy",
  "strange",
  "strong",
  "stupid",
  "sturdy",
  "subtle",
  "sweet",
  "swift",
  "tall",
  "tame",
  "tasty",
  "tender",
  "tense",
  "terrible",
  "thirsty",
  "thoughtful",
  "tidy",
  "tiny",
  "tired",
  "tough",
  "ugly",
  "uneven",
  "upset",
  "vast",
  "victorious",
  "vivacious",
  "wandering",
  "warm",
  "weary",
  "wet",
  "whispering",
  "wicked",
  "wide",
  "wild",
  "windy",
  "wise",
  "witty",
  "wooden",
  "worried",
  "wrong",
  "yellow",
  "young",
  "zany",
  "zealous",
]
NOUNS = [
  "account",
  "actor",
  "airport",
  "alarm",
  "anchor",
  "angle",
  "animal",
  "answer",
  "apple",
  "argument",
  "army",
  "arrow",
  "attic",
  "author",
  "baby",
  "badge",
  "bakery",
  "balloon",
  "banana",
  "band",
  "barn",
  "basket",
  "battle",
  "beach",
  "beard",
  "bell",
  "berry",
  "bicycle",
  "bird",
  "blanket",
  "blossom",
  "boat",
  "bone",
  "book",
  "boot",
  "bottle",
  "boundary",
  "branch",
  "bread",
  "breakfast",
  "brick",
  "bridge",
  "brother",
  "bubble",
  "bucket",
  "building",
  "butter",
  "button",
  "cabin",
  "cable",
  "cactus",
  "cake",
  "camera",
  "camp",
  "candle",
  "canvas",
  "captain",
  "carpet",
  "castle",
  "cattle",
  "cave",
  "cellar",
  "chair",
  "chalk",
  "channel",
  "cheese",
  "cherry",
  "chicken",
  "chimney",
  "church",
  "circle",
  "city",
  "cliff",
  "clock",
  "cloud",
  "coast",
  "coffee",
  "comet",
  "copper",
  "corner",
  "cotton",
  "country",
  "cousin",
  "crayon",
  "creature",
  "crowd",
  "crown",
  "cup",
  "curtain",
  "cushion",
  "dance",
  "desert",
  "diamond",
  "dinner",
  "doctor",
  "dolphin",
  "donkey",
  "dragon",
  "drawer",
  "dream",
  "drum",
  "eagle",
  "earth",
  "elbow",
  "engine",
  "falcon",
  "farm",
  "feather",
  "fence",
  "festival",
  "field",
  "finger",
  "flame",
  "flower",
  "forest",
  "fountain",
  "fox",
  "frog",
  "fruit",
  "galaxy",
  "garden",
  "gate",
  "ghost",
  "giraffe",
  "glacier",
  "glove",
  "goat",
  "gold",
  "grape",
  "grass",
  "guitar",
  "hammer",
  "harbor",
  "harvest",
  "hat",
  "hill",
  "honey",
  "horizon",
  "horse",
  "hotel",
  "island",
  "jacket",
  "jelly",
  "jewel",
  "journey",
  "kettle",
  "kingdom",
  "kitten",
  "ladder",
  "lake",
  "lamp",
  "lantern",
  "lemon",
  "library",
  "lighthouse",
  "lion",
  "lizard",
  "machine",
  "magnet",
  "maple",
  "market",
  "meadow",
  "melody",
  "mirror",
  "monkey",
  "moon",
  "mountain",
  "museum",
  "needle",
  "nest",
  "ocean",
  "office",
  "onion",
  "orchard",
  "owl",
  "oyster",
  "painter",
  "palace",
  "parcel",
  "parrot",
  "pasta",
  "pebble",
  "pencil",
  "pepper",
  "piano",
  "pillow",
  "pirate",
  "planet",
  "pocket",
  "pond",
  "potato",
  "puzzle",
  "quilt",
  "rabbit",
  "rainbow",
  "record",
  "river",
  "robot",
  "rocket",
  "saddle",
  "sailor",
  "salad",
  "sandwich",
  "scarf",
  "school",
  "shadow",
  "shelf",
  "shoe",
  "shortage",
  "silver",
  "singer",
  "sister",
  "snake",
  "soldier",
  "spider",
  "spoon",
  "squirrel",
  "stable",
  "station",
  "statue",
  "stone",
  "storm",
  "stream",
  "sugar",
  "summer",
  "sunset",
  "swan",
  "table",
  "teacher",
  "temple",
  "thunder",
  "ticket",
  "tiger",
  "timber",
  "tomato",
  "tower",
  "trail",
  "train",
  "treasure",
  "tree",
  "trumpet",
  "tunnel",
  "turtle",
  "umbrella",
  "valley",
  "velvet",
  "village",
  "violin",
  "volcano",
  "wagon",
  "wallet",
  "walrus",
  "water",
  "whale",
  "wheel",
  "whistle",
  "window",
  "winter",
  "wizard",
  "wolf",
  "yacht",
  "zebra",
]
KEY_WORDS = sorted({f"{a}-{n}" for a in ADJECTIVES for n in NOUNS})


# ---- text sources ----------------------------------------------------------------------------------

_CACHE: dict = {}


def essay_words() -> list[str]:
  """The essay haystack's words: pydoc_data's topics in sorted-key order, whitespace-split."""
  if "essay" not in _CACHE:
    from pydoc_data.topics import topics

    _CACHE["essay"] = " ".join(topics[k].strip() for k in sorted(topics)).split()
  return _CACHE["essay"]


def common_word_pool() -> list[str]:
  """cwe's vocabulary: distinct lowercase words of 4-10 letters in the pydoc text, sorted."""
  if "pool" not in _CACHE:
    words = {w for w in essay_words() if re.fullmatch(r"[a-z]{4,10}", w)}
    _CACHE["pool"] = sorted(words)
  return _CACHE["pool"]


def split_sentences(text: str) -> list[str]:
  """A light sent_tokenize: break after . ! ? followed by whitespace."""
  return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def random_value(rng: random.Random, kind: str) -> str:
  if kind == "numbers":
    return str(rng.randint(10**6, 10**7 - 1))  # RULER: 7 digits
  if kind == "uuids":
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))
  if kind == "words":
    return rng.choice(KEY_WORDS)
  raise ValueError(f"unknown value type {kind!r}")


def distinct_values(rng: random.Random, kind: str, n: int, avoid=()) -> list[str]:
  out: list[str] = []
  while len(out) < n:
    v = random_value(rng, kind)
    if v not in out and v not in avoid:
      out.append(v)
  return out


# ---- the task generators: (rng, size) -> (context, format fields, expected outputs) ----------------


def gen_niah(rng: random.Random, size: int, spec: dict):
  """Needles "One of the special magic <values> for <key> is: <value>." in a haystack of `size`
  noise paragraphs / essay words / distractor needles."""
  keys = distinct_values(rng, spec["key"], spec["k"])
  values = [distinct_values(rng, spec["value"], spec["v"]) for _ in keys]
  needles = [
    NEEDLE.format(type_needle_v=spec["value"], key=k, value=v) for k, vs in zip(keys, values) for v in vs
  ]
  rng.shuffle(needles)
  if spec["haystack"] == "essay":
    sents = split_sentences(" ".join(essay_words()[:size]))
    cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
    parts = []
    for i in range(1, len(cuts)):
      parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
      if i - 1 < len(needles):
        parts.append(needles[i - 1])
    context = " ".join(p for p in parts if p)
  else:
    if spec["haystack"] == "noise":
      sentences = [NOISE] * size
    else:  # "needle": distractor needles with other keys and values
      other = distinct_values(rng, spec["key"], size, avoid=keys)
      sentences = [
        NEEDLE.format(type_needle_v=spec["value"], key=k, value=random_value(rng, spec["value"]))
        for k in other
      ]
    for index, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
      sentences.insert(index, needle)
    context = "\n".join(sentences)
  picked = rng.sample(range(spec["k"]), spec["q"])
  queries = [keys[i] for i in picked]
  outputs = [v for i in picked for v in values[i]]
  query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
  return context, dict(query=query, type_needle_v=spec["value"]), outputs


def _vt_chain(rng: random.Random, hops: int, letters: int) -> tuple[list[str], list[str]]:
  names: list[str] = []
  while len(names) < hops + 1:
    n = "".join(rng.choices(string.ascii_uppercase, k=letters))
    if n not in names:
      names.append(n)
  chain = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
  chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
  return names, chain


def _vt_context(rng: random.Random, noises: int, chain: list[str]) -> str:
  sentences = [NOISE + "\n"] * noises
  for j, pos in enumerate(sorted(rng.sample(range(len(sentences)), len(chain)))):
    sentences.insert(pos + j, chain[j])
  return "\n".join(sentences).replace(". \n", ".\n")


def gen_vt(rng: random.Random, size: int, spec: dict):
  """Variable tracking: VAR X = 12345, VAR Y = VAR X, ... hidden among `size` noise lines; a one-shot
  example (3-letter names, 5 noise lines) comes first, as RULER's in-context example."""
  ex_names, ex_chain = _vt_chain(rng, spec["hops"], 3)
  ex_value = ex_chain[0].split("=")[-1].strip()
  ex_fields = dict(query=ex_value, num_v=spec["hops"] + 1)
  example = (
    TEMPLATES["vt"].format(context=_vt_context(rng, 5, ex_chain), **ex_fields)
    + ANSWER_PREFIXES["vt"].format(**ex_fields)
    + " ".join(ex_names)
  )
  names, chain = _vt_chain(rng, spec["hops"], 5)
  value = chain[0].split("=")[-1].strip()
  return _vt_context(rng, size, chain), dict(query=value, num_v=spec["hops"] + 1, example=example), names


def _cwe_list(rng: random.Random, num_words: int, common_reps: int, rare_reps: int, num_common: int):
  words = rng.sample(common_word_pool(), num_words)
  common, rare = words[:num_common], words[num_common:]
  items = common * common_reps + rare * rare_reps
  rng.shuffle(items)
  return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common


def gen_cwe(rng: random.Random, size: int, spec: dict, long_context: bool = False):
  """Common words: `size` distinct words, 10 of them repeated more often (6x vs 1x below 4K tokens,
  freq_cw x vs freq_ucw x from 4K on, as RULER), after a one-shot example."""
  if long_context:
    ex_ctx, ex_ans = _cwe_list(rng, 40, 10, 3, spec["num_cw"])
    reps = (spec["freq_cw"], spec["freq_ucw"])
  else:
    ex_ctx, ex_ans = _cwe_list(rng, 20, 3, 1, spec["num_cw"])
    reps = (6, 1)
  example = (
    TEMPLATES["cwe"].format(context=ex_ctx)
    + ANSWER_PREFIXES["cwe"]
    + " "
    + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans))
  )
  context, common = _cwe_list(rng, size, reps[0], reps[1], spec["num_cw"])
  return context, dict(example=example), common


def _zeta(alpha: float) -> float:
  """Riemann zeta(alpha), alpha > 1 (RULER uses scipy.special.zeta): partial sum + integral tail."""
  key = ("zeta", alpha)
  if key not in _CACHE:
    _CACHE[key] = sum(k**-alpha for k in range(1, 100_000)) + 100_000 ** (1 - alpha) / (alpha - 1)
  return _CACHE[key]


def _fwe_text(rng: random.Random, num_words: int, wordlen: int, vocab_size: int, alpha: float):
  vocab: set[str] = set()
  while len(vocab) < vocab_size:
    vocab.add("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
  ranked = sorted(vocab)
  rng.shuffle(ranked)
  ranked[0] = "..."  # the most frequent "word" is noise
  zeta = _zeta(alpha)
  words = [w for k, w in enumerate(ranked, 1) for _ in range(int(num_words * k**-alpha / zeta))]
  rng.shuffle(words)
  return " ".join(words), ranked[1:4]


def gen_fwe(rng: random.Random, size: int, spec: dict):
  """Frequent words: Zipf(alpha)-distributed coded words (`size` draws); the answer is ranks 2-4
  (rank 1 is "..."). A one-shot example with a 10-word vocabulary of 3-letter words comes first."""
  ex_text, ex_ans = _fwe_text(rng, 60, 3, 10, spec["alpha"])
  example = TEMPLATES["fwe"].format(context=ex_text) + ANSWER_PREFIXES["fwe"] + " " + " ".join(ex_ans)
  text, top = _fwe_text(rng, size, spec["coded_wordlen"], spec["vocab_size"], spec["alpha"])
  return text, dict(example=example), top


GENERATORS = {"niah": gen_niah, "vt": gen_vt, "cwe": gen_cwe, "fwe": gen_fwe}
MIN_SIZE = {"niah": 8, "vt": 5, "cwe": 20, "fwe": 60}


def build(task: str, index: int, seed: int, size: int, long_context: bool = False) -> dict:
  """One sample at haystack size `size`; the same (task, index, seed, size) always gives the same text.

  The formatted RULER input is split before the final query sentence: `context` (instruction +
  haystack, with any one-shot example in front) and `question` (starts with "\\n").
  """
  spec = TASKS[task]
  kind = spec["kind"]
  rng = random.Random(f"ruler/{seed}/{task}/{index}")
  kwargs = dict(long_context=long_context) if kind == "cwe" else {}
  haystack, fields, outputs = GENERATORS[kind](rng, size, spec, **kwargs)
  template, prefix = TEMPLATES[kind], ANSWER_PREFIXES[kind]
  example = fields.pop("example", None)
  if kind == "niah" and spec["q"] * spec["v"] == 1:  # RULER's singular rewrite, prefix included
    joined = f"{template}\u0001{prefix}"
    for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
      joined = joined.replace(a, b)
    template, prefix = joined.split("\u0001")
    fields["type_needle_v"] = fields["type_needle_v"][:-1]
  marker = "\u0000HAYSTACK\u0000"
  formatted = template.format(context=marker, **fields)
  cut = formatted.index("\n", formatted.index(marker))
  context = formatted[:cut].replace(marker, haystack)
  if example is not None:
    context = example + "\n" + context
  return {
    "task": task,
    "index": index,
    "seed": seed,
    "size": size,
    "context": context,
    "question": formatted[cut:],
    "answer_prefix": prefix.format(**fields),
    "outputs": outputs,
  }


def make_sample(task: str, index: int, seed: int, max_tokens: int, count_tokens) -> dict:
  """The largest haystack whose prompt + RULER's tokens_to_generate fits max_tokens (RULER's rule).

  count_tokens(sample) -> prompt tokens (chat template included); binary search over the size.
  """
  kind = TASKS[task]["kind"]
  room = max_tokens - TOKENS_TO_GENERATE[kind]
  long_context = max_tokens >= 4096
  fits = lambda n: count_tokens(build(task, index, seed, n, long_context)) <= room
  lo = MIN_SIZE[kind]
  limit = len(common_word_pool()) if kind == "cwe" else 10**7  # cwe draws distinct words
  if not fits(lo):
    raise ValueError(f"{task}: {max_tokens} tokens cannot hold even the smallest haystack ({lo})")
  hi = lo * 2
  while hi <= limit and fits(hi):
    lo, hi = hi, hi * 2
  hi = min(hi, limit + 1)
  while hi - lo > 1:  # fits(lo), not fits(hi)
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return build(task, index, seed, lo, long_context)


def word_count_tokens(sample: dict) -> int:
  """A model-free length estimate (tests): about 1.3 tokens per whitespace word."""
  text = sample["context"] + sample["question"] + sample["answer_prefix"]
  return math.ceil(1.3 * len(text.split()))


# ---- running on the model --------------------------------------------------------------------------


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--lengths",
    type=int,
    nargs="+",
    default=[1024, 2048],
    help="max sequence length (prompt + tokens_to_generate), RULER's convention; 4096 works",
  )
  p.add_argument("--samples", type=int, default=5, help="samples per task")
  p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
  p.add_argument("--presses", nargs="+", default=["full", "snapkv", "ada-snapkv"])
  p.add_argument(
    "--ratios",
    type=float,
    nargs="+",
    default=[0.5, 0.7],
    help="compression_ratio (fraction evicted): 0.5 / 0.7 = the paper's 50%% / 30%% kept",
  )
  p.add_argument("--modes", nargs="+", default=["aware", "agnostic"], choices=["aware", "agnostic"])
  p.add_argument("--short-gen", action="store_true", help="cap generated tokens per task (SHORT_GEN)")
  p.add_argument("--model", default=None, help="default: smollm2-135m")
  p.add_argument("--seed", type=int, default=0)
  common.add_press_args(p, gqa=True, kernel=True)
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument(
    "--replot", action="store_true", help="recompute the comparisons and redraw the PNG from the JSON"
  )
  p.add_argument(
    "--against",
    nargs="+",
    default=None,
    help="results/<name>.json of runs on the same samples: compare each press with the same press there "
    "(with --replot: add the comparisons to an existing run)",
  )
  p.add_argument("--out", default="ruler", help="results/<out>.json / .png")
  a = p.parse_args()
  if a.quick:
    a.lengths, a.samples, a.ratios, a.short_gen = [512], 2, [0.7], True
    a.tasks = ["niah_single_1", "niah_multikey_2"]  # vt and cwe need about 1K tokens
    a.out = "ruler_quick" if a.out == "ruler" else a.out
  return a


def configurations(a) -> list[tuple[str, str, float | None]]:
  """(mode, press, compression_ratio); full once per mode (in agnostic mode it checks the append path)."""
  out = []
  for mode in a.modes:
    for press in a.presses:
      out += [(mode, press, None)] if press == "full" else [(mode, press, r) for r in a.ratios]
  return out


def config_label(cfg: tuple) -> str:
  mode, press, ratio = cfg
  return f"{mode}/{press}" if ratio is None else f"{mode}/{press}@{round(100 * (1 - ratio))}%"


class Runner:
  """The model plus the capture -> compress -> (append) -> decode path of a batch of samples."""

  def __init__(self, model: str | None, args):
    self.cfg, self.params, self.tok = common.load(model or common.MODEL)
    self.args = args
    self.eos = tuple(self.tok.eos_token_ids) or tuple(self.cfg.eos_token_ids)
    chat = self.tok.chat_template is not None
    self.head, self.tail = self.tok.chat_split() if chat else ("", "\n")
    self.bos = not chat

  def encode(self, s: dict) -> tuple[list[int], list[int]]:
    """(context ids, question ids); context + question is the question-aware prompt."""
    ctx = self.tok.encode(self.head + s["context"], add_special_tokens=self.bos)
    q = self.tok.encode(s["question"] + self.tail + s["answer_prefix"].lstrip(), add_special_tokens=False)
    return ctx, q

  def count(self, s: dict) -> int:
    ctx, q = self.encode(s)
    return len(ctx) + len(q)

  def press(self, name: str, ratio):
    return common.build_press(name, self.args, **({} if ratio is None else {"compression_ratio": ratio}))

  def plan(self, tasks: list[list[dict]], configs: list[tuple], gen_max: int) -> None:
    """One cache plan per mode for every task of a length (common.fitting_plan): each configuration's cache
    then has one shape, and the question append and the decode loop compile once per mode. The room is
    the longest generation (and, question-agnostic, the longest question) of the length."""
    enc = [self.encode(s) for samples in tasks for s in samples]
    self.q_pad = max(len(q) for _, q in enc)
    self.gen_max = gen_max
    self.presses = {cf: self.press(cf[1], cf[2]) for cf in configs}
    lens = {
      "aware": [[self.count(s) for s in samples] for samples in tasks],
      "agnostic": [[len(self.encode(s)[0]) for s in samples] for samples in tasks],
    }
    rooms = {"aware": gen_max, "agnostic": self.q_pad + gen_max}
    self.plans = {
      mode: common.fitting_plan(
        self.cfg,
        lens[mode],
        [p for cf, p in self.presses.items() if cf[0] == mode],
        room=rooms[mode],
        page_size=self.args.page_size,
      )
      for mode in {cf[0] for cf in configs}
    }

  def run(self, samples: list[dict], configs: list[tuple], gen_tokens: int):
    """Generated ids per configuration per sample (out[config][sample]) and each configuration's memory.

    Every configuration decodes up to the length's longest generation and is cut to `gen_tokens`: greedy
    decoding makes those the ids a `gen_tokens` run generates, and one loop shape serves every task."""
    enc = [self.encode(s) for s in samples]
    colsum = any(p is not None and p.needs_colsum for p in self.presses.values())
    t0 = time.perf_counter()
    prompts = {"aware": [ctx + q for ctx, q in enc], "agnostic": [ctx for ctx, _ in enc]}
    caps = {
      mode: common.capture(self.params, self.cfg, prompts[mode], with_colsum=colsum) for mode in self.plans
    }
    jax.block_until_ready([c.logits_BV for c in caps.values()])
    t1 = time.perf_counter()
    questions = [q for _, q in enc]
    outs, mems, t_decode = [], [], 0.0
    for cf in configs:
      mode, cap = cf[0], caps[cf[0]]
      cache, _, mem = common.compress(self.cfg, cap, self.presses[cf], self.plans[mode])
      mems.append(mem)
      logits = cap.logits_BV
      if mode == "agnostic":
        logits, cache = common.ask(self.params, self.cfg, cache, questions, width=self.q_pad)
      td = time.perf_counter()
      ids = common.decode(
        self.params,
        self.cfg,
        common.greedy_first(logits),
        cache,
        max_new_tokens=self.gen_max,
        eos_ids=self.eos,
      )
      outs.append([x[:gen_tokens] for x in ids])
      t_decode += time.perf_counter() - td
    self.seconds = {
      "prefill": t1 - t0,
      "compress_append": time.perf_counter() - t1 - t_decode,
      "decode": t_decode,
      "decoded_tokens": sum(len(x) for o in outs for x in o),
    }
    return outs, mems


def main():
  a = parse_args()
  if a.replot:
    payload = common.read_json(a.out)
    print_summary(payload["summary"], sorted({s["length"] for s in payload["summary"]}))
    if all("memory" in r for r in payload["results"]):  # runs that record each cache's bytes
      payload["comparisons"] = compare(payload["results"])  # recomputed from the rows, as a run would
      print_comparisons(payload["comparisons"])
      if a.against:
        against(payload, a)
      else:
        common.write_json(a.out, payload)
    plot(payload, a.out)
    return
  from tqdm import tqdm

  configs = configurations(a)
  gen = {t: (SHORT_GEN[t] if a.short_gen else TOKENS_TO_GENERATE[TASKS[t]["kind"]]) for t in a.tasks}
  runner = Runner(a.model, a)
  rows, samples_meta, timings = [], [], {}
  t_all = time.perf_counter()
  for length in a.lengths:
    tasks = {
      task: [make_sample(task, i, a.seed, length, runner.count) for i in range(a.samples)] for task in a.tasks
    }
    runner.plan(list(tasks.values()), configs, max(gen.values()))
    for task in tqdm(a.tasks, desc=f"RULER {length}", unit="task"):
      t0 = time.perf_counter()
      samples = tasks[task]
      outs, mems = runner.run(samples, configs, gen[task])
      for cf, ids, mem in zip(configs, outs, mems):
        preds = [runner.tok.decode(x) for x in ids]
        refs = [s["outputs"] for s in samples]
        rows.append(
          {
            "length": length,
            "task": task,
            "mode": cf[0],
            "press": cf[1],
            "ratio": cf[2],
            "kept": None if cf[2] is None else round(1 - cf[2], 3),
            "config": config_label(cf),
            "score": metrics.ruler_score(preds, refs),
            "per_sample": [
              metrics.string_match_all(metrics.ruler_postprocess(p), r) for p, r in zip(preds, refs)
            ],
            "memory": mem,
            "predictions": preds,
          }
        )
      samples_meta += [
        {
          "length": length,
          "task": task,
          "index": s["index"],
          "size": s["size"],
          "prompt_tokens": runner.count(s),
          "outputs": s["outputs"],
        }
        for s in samples
      ]
      timings[f"{length}/{task}"] = {
        "total": round(time.perf_counter() - t0, 1),
        **{k: round(v, 1) for k, v in runner.seconds.items()},
      }
      tqdm.write(f"{length}/{task}: {timings[f'{length}/{task}']}")
  summary = summarize(rows)
  payload = {
    "meta": common.run_meta(
      a, model=a.model or common.MODEL, python=sys.version, wall_s=round(time.perf_counter() - t_all, 1)
    ),
    "tasks": {t: TASKS[t] for t in a.tasks},
    "skipped_tasks": ["qa_1", "qa_2"],
    "deviations_from_ruler": DEVIATIONS,
    "generated_tokens": gen,
    "summary": summary,
    "comparisons": compare(rows),
    "results": rows,
    "samples": samples_meta,
    "task_seconds": timings,
  }
  common.write_json(a.out, payload)
  print_summary(summary, a.lengths)
  print_comparisons(payload["comparisons"])
  if a.against:  # after the run is on disk: a refused comparison must not lose it
    against(payload, a)
  plot(payload, a.out)


def against(payload: dict, a) -> None:
  """Adds the comparison with each --against run to the payload (`against`, by run name) and rewrites this
  run's JSON."""
  payload["against"] = {name: compare_runs(payload, common.read_json(name), name) for name in a.against}
  for name, run in payload["against"].items():
    print(f"\nagainst {name} ({run['differs']}):")
    print_comparisons(run["comparisons"], lambda c: (f"{c['a']} (this run)", f"{c['b']} (there)"))
  common.write_json(a.out, payload)


def summarize(rows: list[dict]) -> list[dict]:
  """Per (length, config): the mean over tasks and each task's score."""
  out = {}
  for r in rows:
    key = (r["length"], r["config"])
    out.setdefault(
      key,
      {
        "length": r["length"],
        "config": r["config"],
        "mode": r["mode"],
        "press": r["press"],
        "kept": r["kept"],
        "tasks": {},
      },
    )["tasks"][r["task"]] = r["score"]
    out[key].setdefault("allocated_mib", []).append(r["memory"]["allocated_bytes"] / 2**20)
  for v in out.values():
    v["average"] = round(sum(v["tasks"].values()) / len(v["tasks"]), 2)
    v["allocated_mib_mean"] = round(sum(v["allocated_mib"]) / len(v["allocated_mib"]), 3)  # over tasks
    del v["allocated_mib"]
  return list(out.values())


# (adaptive, uniform) pairs compared when both ran: the allocation is the only difference.
PAIRS = [("ada-snapkv", "snapkv"), ("ada-pyramidkv", "pyramidkv"), ("ada-snapkv", "pyramidkv")]


def compare(rows: list[dict], other: list[dict] | None = None, pairs=PAIRS) -> list[dict]:
  """Paired comparisons of two presses on the same samples, per (length, mode, kept share) and pooled over
  the shares: McNemar's exact test on whole answers (a sample's recall is 1), and the paired difference
  of recall (partial credit: vt's names, multi-query's values) with its standard error and sign test;
  allocated bytes of both beside. With `other` (another run's rows on the same samples), a press is
  looked up in this run and b in the other."""
  by_a, by_b = (
    {(r["length"], r["mode"], r["press"], r["ratio"], r["task"]): r for r in rs}
    for rs in (rows, rows if other is None else other)
  )
  out = []
  ratios = sorted({r["ratio"] for r in rows if r["ratio"] is not None})
  for length in sorted({r["length"] for r in rows}):
    for mode in sorted({r["mode"] for r in rows}):
      for a, b in pairs:
        for share in [*([x] for x in ratios), *([ratios] if len(ratios) > 1 else [])]:
          keys = [
            (task, ratio)
            for (ln, md, pr, ratio, task) in by_a
            if ln == length
            and md == mode
            and pr == a
            and ratio in share
            and (length, mode, b, ratio, task) in by_b
          ]
          if not keys:
            continue
          ra = [by_a[(length, mode, a, ratio, task)] for task, ratio in keys]
          rb = [by_b[(length, mode, b, ratio, task)] for task, ratio in keys]
          sa = [x for r in ra for x in r["per_sample"]]
          sb = [x for r in rb for x in r["per_sample"]]
          diff = metrics.paired_differences(sa, sb)
          out.append(
            {
              "length": length,
              "mode": mode,
              "a": a,
              "b": b,
              "kept": [round(1 - x, 3) for x in share],
              "tasks": sorted({t for t, _ in keys}),
              **metrics.mcnemar([x == 1.0 for x in sa], [x == 1.0 for x in sb]),
              "recall_a": round(float(np.mean(sa)), 4),
              "recall_b": round(float(np.mean(sb)), 4),
              "recall_diff_mean": round(diff["mean"], 4),
              "recall_diff_se": None if diff["se"] is None else round(diff["se"], 4),
              "recall_a_higher": diff["a_higher"],
              "recall_a_lower": diff["a_lower"],
              "recall_sign_p": float(f"{diff['sign_p']:.3g}"),  # significant digits: small p stay nonzero
              "allocated_bytes_ratio": round(
                sum(r["memory"]["allocated_bytes"] for r in ra)
                / sum(r["memory"]["allocated_bytes"] for r in rb),
                4,
              ),
            }
          )
  return out


# What makes two runs' samples the same trials: the generator's outputs at the same prompt length.
SAMPLE_IDENTITY = ("length", "task", "index", "prompt_tokens", "outputs")


def compare_runs(payload: dict, other: dict, other_name: str) -> dict:
  """Each press of this run against the same press in another run on the same samples (e.g. page against
  token granularity, query- against KV-head budgets): the settings that differ and compare() per press."""
  ours, theirs = ([tuple(str(s[k]) for k in SAMPLE_IDENTITY) for s in p["samples"]] for p in (payload, other))
  common.require_same_trials(
    ours, theirs, "sample", other_name, "the model, lengths, tasks, seed or sample count"
  )
  settings = ("model", "granularity", "page_size", "gqa", "kernel")  # what runs can vary on the same samples
  presses = sorted(
    {r["press"] for r in payload["results"]} & {r["press"] for r in other["results"]} - {"full"}
  )
  return {
    "run": other_name,
    "differs": common.settings_that_differ(payload["meta"]["args"], other["meta"]["args"], settings),
    "comparisons": compare(payload["results"], other["results"], pairs=[(p, p) for p in presses]),
  }


def print_comparisons(comparisons: list[dict], label=lambda c: (c["a"], c["b"])) -> None:
  for c in comparisons:
    a, b = label(c)
    print(
      f"{c['length']} {c['mode']} kept {c['kept']}: {a} {c['a_correct']}/{c['n']} vs {b} "
      f"{c['b_correct']}/{c['n']} (McNemar p = {c['p_value']:.3g}; recall diff {c['recall_diff_mean']:+.3f}, "
      f"sign p = {c['recall_sign_p']:.3g}; bytes {c['allocated_bytes_ratio']:.3f}x)"
    )


def print_summary(summary: list[dict], lengths: list[int]) -> None:
  for length in lengths:
    part = [s for s in summary if s["length"] == length]
    tasks = list(part[0]["tasks"]) if part else []
    short = {t: t.replace("niah_", "") for t in tasks}
    print(f"\nRULER {length} tokens, score per task (%), string-match recall")
    common.print_table(
      [
        {
          "config": s["config"],
          **{short[t]: s["tasks"][t] for t in tasks},
          "avg": s["average"],
          "MiB": s.get("allocated_mib_mean", ""),
        }
        for s in part
      ],
      ["config", *short.values(), "avg", "MiB"],
    )


def plot(payload: dict, name: str) -> None:
  """Per length: a config x task heatmap of scores, averages in the last column."""
  import numpy as np

  plt = common.pyplot()
  summary = payload["summary"]
  lengths = sorted({s["length"] for s in summary})
  fig, axes = plt.subplots(
    len(lengths), 1, figsize=(13, 0.45 * len(summary) / len(lengths) + 2.2), squeeze=False
  )
  for ax, length in zip(axes[:, 0], lengths):
    part = [s for s in summary if s["length"] == length]
    tasks = list(part[0]["tasks"])
    grid = np.array([[s["tasks"][t] for t in tasks] + [s["average"]] for s in part])
    ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(
      range(len(tasks) + 1),
      [t.replace("niah_", "") for t in tasks] + ["AVERAGE"],
      rotation=30,
      ha="right",
      fontsize=8,
    )
    ax.set_yticks(range(len(part)), [s["config"] for s in part], fontsize=8)
    for (i, j), v in np.ndenumerate(grid):
      ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    ax.axvline(len(tasks) - 0.5, color="w", lw=2)
    ax.set_title(
      f"RULER (11 synthetic tasks) at {length} tokens, {payload['meta']['model']}: "
      "string-match recall %, kept = cache fraction kept",
      fontsize=9,
    )
  fig.tight_layout()
  common.save_png(fig, name)


if __name__ == "__main__":
  main()
