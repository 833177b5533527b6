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

Speed (CPU): one prefill per batch of samples serves every press and both modes. Keys, values and
queries of the first n positions do not depend on later tokens (causal), so the question-agnostic
compression uses the same prefill's per-layer tensors with the window queries taken at the end of the
context; `experiments/common.py`'s compress then runs the library's own compress_layer per press.
Every configuration's cache is then decoded in shared batches. `--verify` checks this path against
adakv_jax.generation.generate on one sample.

    python experiments/ruler.py --lengths 1024 --samples 5 --short-gen   # the CPU grid (~15 min, 2 cores)
    python experiments/ruler.py --quick                                   # smoke run
    python experiments/ruler.py --replot
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import metrics  # noqa: E402

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
    "chat template: the model's own; RULER's answer prefix opens the assistant turn (leading space "
    "stripped)",
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
SHORT_GEN = {"niah_single_1": 16, "niah_single_2": 16, "niah_single_3": 48, "niah_multikey_1": 16,
             "niah_multikey_2": 16, "niah_multikey_3": 48, "niah_multivalue": 56, "niah_multiquery": 64,
             "vt": 30, "cwe": 56, "fwe": 24}

TEMPLATES = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to "
             "memorize it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all "
             "the special magic {type_needle_v} for {query} mentioned in the provided text?"),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
           "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above."),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
            "words in the above list?"),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three "
            "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
            "Please ignore the dots '....'. What are the three most frequently appeared words in the "
            "above coded text?"),
}
ANSWER_PREFIXES = {
    "niah": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    # "assgined" is RULER's spelling
    "vt": (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
           "variables are assgined the value {query}, they are: "),
    "cwe": " Answer: The top 10 words that appear most often in the list are:",
    "fwe": " Answer: According to the coded text above, the three most frequently appeared words are:",
}
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40))

ADJECTIVES = (
    "abundant adorable agreeable alive ancient angry anxious aquatic arrogant ashamed awful bashful bewildered "
    "bitter black blue bored brave breezy bright broad broken bumpy busy calm careful cheerful chilly clean "
    "clever cloudy clumsy colossal cool crazy creepy crooked crowded cruel curious curly cynical damp dazzling "
    "deep defiant delightful dizzy drab dry dusty eager early elated elegant empty enchanting energetic "
    "enormous envious evil excited fair faithful famous fancy fierce filthy flaky fluffy foolish fragile "
    "frail frantic fresh friendly frightened funny fuzzy gentle giant gifted glamorous gleaming glorious "
    "gorgeous graceful greasy great green grumpy handsome happy harsh healthy heavy helpful helpless hollow "
    "homely huge hungry icy itchy jealous jittery jolly juicy kind large lazy light little lively lonely "
    "long loud lovely lucky magnificent mellow melodic misty modern mushy mysterious narrow nasty naughty "
    "nervous nice noisy numerous nutty obedient odd old orange panicky perfect plain pleasant polite "
    "powerful precious prickly proud puzzled quaint quick quiet rapid rare raspy red rich ripe rotten rough "
    "round rusty salty scary scrawny selfish shaggy shaky shallow sharp shiny short shy silent silky silly "
    "skinny slimy slippery small smooth soft sour sparkling spicy splendid spotty square steady sticky "
    "stormy strange strong stupid sturdy subtle sweet swift tall tame tasty tender tense terrible thirsty "
    "thoughtful tidy tiny tired tough ugly uneven upset vast victorious vivacious wandering warm weary wet "
    "whispering wicked wide wild windy wise witty wooden worried wrong yellow young zany zealous").split()
NOUNS = (
    "account actor airport alarm anchor angle animal answer apple argument army arrow attic author baby "
    "badge bakery balloon banana band barn basket battle beach beard bell berry bicycle bird blanket blossom "
    "boat bone book boot bottle boundary branch bread breakfast brick bridge brother bubble bucket building "
    "butter button cabin cable cactus cake camera camp candle canvas captain carpet castle cattle cave "
    "cellar chair chalk channel cheese cherry chicken chimney church circle city cliff clock cloud coast "
    "coffee comet copper corner cotton country cousin crayon creature crowd crown cup curtain cushion "
    "dance desert diamond dinner doctor dolphin donkey dragon drawer dream drum eagle earth elbow engine "
    "falcon farm feather fence festival field finger flame flower forest fountain fox frog fruit galaxy "
    "garden gate ghost giraffe glacier glove goat gold grape grass guitar hammer harbor harvest hat hill "
    "honey horizon horse hotel island jacket jelly jewel journey kettle kingdom kitten ladder lake lamp "
    "lantern lemon library lighthouse lion lizard machine magnet maple market meadow melody mirror monkey "
    "moon mountain museum needle nest ocean office onion orchard owl oyster painter palace parcel parrot "
    "pasta pebble pencil pepper piano pillow pirate planet pocket pond potato puzzle quilt rabbit rainbow "
    "record river robot rocket saddle sailor salad sandwich scarf school shadow shelf shoe shortage silver "
    "singer sister snake soldier spider spoon squirrel stable station statue stone storm stream sugar "
    "summer sunset swan table teacher temple thunder ticket tiger timber tomato tower trail train treasure "
    "tree trumpet tunnel turtle umbrella valley velvet village violin volcano wagon wallet walrus water "
    "whale wheel whistle window winter wizard wolf yacht zebra").split()
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
  needles = [NEEDLE.format(type_needle_v=spec["value"], key=k, value=v) for k, vs in zip(keys, values)
             for v in vs]
  rng.shuffle(needles)
  if spec["haystack"] == "essay":
    sents = split_sentences(" ".join(essay_words()[:size]))
    cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))) + [len(sents)]
    parts = []
    for i in range(1, len(cuts)):
      parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
      if i - 1 < len(needles):
        parts.append(needles[i - 1])
    context = " ".join(p for p in parts if p)
  else:
    if spec["haystack"] == "noise":
      sentences = [NOISE] * size
    else:  # "needle": distractor needles with other keys and values
      other = distinct_values(rng, spec["key"], size, avoid=keys)
      sentences = [NEEDLE.format(type_needle_v=spec["value"], key=k, value=random_value(rng, spec["value"]))
                   for k in other]
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
  example = (TEMPLATES["vt"].format(context=_vt_context(rng, 5, ex_chain), **ex_fields)
             + ANSWER_PREFIXES["vt"].format(**ex_fields) + " ".join(ex_names))
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
  example = (TEMPLATES["cwe"].format(context=ex_ctx) + ANSWER_PREFIXES["cwe"] + " "
             + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans)))
  context, common = _cwe_list(rng, size, reps[0], reps[1], spec["num_cw"])
  return context, dict(example=example), common


def _zeta(alpha: float) -> float:
  """Riemann zeta(alpha), alpha > 1 (RULER uses scipy.special.zeta): partial sum + integral tail."""
  key = ("zeta", alpha)
  if key not in _CACHE:
    _CACHE[key] = sum(k ** -alpha for k in range(1, 100_000)) + 100_000 ** (1 - alpha) / (alpha - 1)
  return _CACHE[key]


def _fwe_text(rng: random.Random, num_words: int, wordlen: int, vocab_size: int, alpha: float):
  vocab: set[str] = set()
  while len(vocab) < vocab_size:
    vocab.add("".join(rng.choices(string.ascii_lowercase, k=wordlen)))
  ranked = sorted(vocab)
  rng.shuffle(ranked)
  ranked[0] = "..."  # the most frequent "word" is noise
  zeta = _zeta(alpha)
  words = [w for k, w in enumerate(ranked, 1) for _ in range(int(num_words * k ** -alpha / zeta))]
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
  return {"task": task, "index": index, "seed": seed, "size": size, "context": context,
          "question": formatted[cut:], "answer_prefix": prefix.format(**fields), "outputs": outputs}


def make_sample(task: str, index: int, seed: int, max_tokens: int, count_tokens) -> dict:
  """The largest haystack whose prompt + RULER's tokens_to_generate fits max_tokens (RULER's rule).

  count_tokens(sample) -> prompt tokens (chat template included); binary search over the size.
  """
  kind = TASKS[task]["kind"]
  room = max_tokens - TOKENS_TO_GENERATE[kind]
  long_context = max_tokens >= 4096
  fits = lambda n: count_tokens(build(task, index, seed, n, long_context)) <= room  # noqa: E731
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
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048],
                 help="max sequence length (prompt + tokens_to_generate), RULER's convention; 4096 works")
  p.add_argument("--samples", type=int, default=5, help="samples per task")
  p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
  p.add_argument("--presses", nargs="+", default=["full", "snapkv", "ada-snapkv"])
  p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.7],
                 help="compression_ratio (fraction evicted): 0.5 / 0.7 = the paper's 50%% / 30%% kept")
  p.add_argument("--modes", nargs="+", default=["aware", "agnostic"], choices=["aware", "agnostic"])
  p.add_argument("--short-gen", action="store_true", help="cap generated tokens per task (SHORT_GEN)")
  p.add_argument("--decode-batch", type=int, default=25, help="sequences per decode batch")
  p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                 help="compare the batched path with generate() on one sample (4 configurations)")
  p.add_argument("--model", default=None, help="default: smollm2-135m")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
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
  """The model plus the batched capture -> compress -> (append) -> decode path."""

  def __init__(self, model: str | None, seq_len: int, gen_max: int):
    import common

    self.common = common
    self.cfg, self.params, self.tok = common.load(model or common.MODEL)
    self.eos = set(self.tok.eos_token_ids) or set(self.cfg.eos_token_ids)
    marker = "\u0000CTX\u0000"
    chat = self.tok.chat_template is not None
    self.head, self.tail = (self.tok.apply_chat_template([{"role": "user", "content": marker}]).split(marker)
                            if chat else ("", "\n"))
    self.bos = not chat
    self.seq_len, self.gen_max = seq_len, gen_max

  def encode(self, s: dict) -> tuple[list[int], list[int]]:
    """(context ids, question ids); context + question is the question-aware prompt."""
    ctx = self.tok.encode(self.head + s["context"], add_special_tokens=self.bos)
    q = self.tok.encode(s["question"] + self.tail + s["answer_prefix"].lstrip(), add_special_tokens=False)
    return ctx, q

  def count(self, s: dict) -> int:
    ctx, q = self.encode(s)
    return len(ctx) + len(q)

  def press(self, name: str, ratio):
    from adakv_jax.press import make_press

    return None if name == "full" else make_press(name, compression_ratio=ratio)

  def run(self, samples: list[dict], configs: list[tuple], gen_tokens: int, decode_batch: int,
          presses: dict | None = None):
    """Generated ids per configuration per sample: out[config][sample]. presses: {config: Press or None}
    overrides the (mode, press name, compression_ratio) reading of the configurations."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from adakv_jax import model as model_lib

    c = self.common
    enc = [self.encode(s) for s in samples]
    full = [ctx + q for ctx, q in enc]
    tokens, len_full, chunk = c.pad_batch(full)
    len_ctx = jnp.asarray([len(ctx) for ctx, _ in enc], jnp.int32)
    presses = presses or {cf: self.press(cf[1], cf[2]) for cf in configs}
    colsum = any(p is not None and p.needs_colsum for p in presses.values())
    t0 = time.perf_counter()
    logits, per_layer = capture_two_windows(self.params, tokens, len_full, len_ctx, cfg=self.cfg, chunk=chunk,
                                            window=32, with_colsum=colsum)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    q_max = max(len(q) for _, q in enc)
    q_pad = max(96, -(-q_max // 32) * 32)  # fixed in practice: one compile of append and compress
    capacity = self.seq_len + q_pad + self.gen_max  # one static capacity: one compile per press
    # K/V cut to the longest real prompt, not the padded length: the press's per-head cap (ratio mode)
    # is then head_cap(longest prompt), the cap Press.capacity reserves room for (see README_paper.md)
    max_ctx, max_full = max(len(ctx) for ctx, _ in enc), max(len(f) for f in full)
    q_ids = np.zeros((len(samples), q_pad), np.int32)
    for i, (_, q) in enumerate(enc):
      q_ids[i, :len(q)] = q
    q_len = jnp.asarray([len(q) for _, q in enc], jnp.int32)
    first_aware = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    states = []  # (first token [B], cache) per configuration
    for cf in configs:
      press = presses[cf]
      if cf[0] == "aware":
        cap = {k: per_layer[k][..., :max_full, :] if k in ("k", "v") else per_layer[k]
               for k in ("q_win", "k", "v", "colsum") if k in per_layer}
        if "colsum" in cap:
          cap["colsum"] = cap["colsum"][..., :max_full]
        cache = self._cache(cap, len_full, press, capacity)
        states.append((first_aware, cache))
        continue
      # question-agnostic: the window queries that end the context, K/V up to the longest context
      cap = {"q_win": per_layer["q_win_ctx"], "k": per_layer["k"][:, :, :, :max_ctx],
             "v": per_layer["v"][:, :, :, :max_ctx]}
      if press is not None and press.needs_colsum:  # H2O sums attention over the context's queries only
        colsum_ctx = c.capture(self.params, tokens, len_ctx, cfg=self.cfg, chunk=chunk, window=32)[1]["colsum"]
        cap["colsum"] = colsum_ctx[..., :max_ctx]
      cache = self._cache(cap, len_ctx, press, capacity)
      q_logits, cache = model_lib.append(self.params, jnp.asarray(q_ids), q_len, cache, cfg=self.cfg,
                                         backend=c.BACKEND)
      states.append((jnp.argmax(q_logits, axis=-1).astype(jnp.int32), cache))
    del per_layer
    jax.block_until_ready(states)
    t2 = time.perf_counter()
    flat = self._decode_all(states, gen_tokens, decode_batch)
    self.seconds = {"prefill": t1 - t0, "compress_append": t2 - t1, "decode": time.perf_counter() - t2,
                    "decoded_tokens": sum(len(x) for x in flat)}
    b = len(samples)
    return [flat[i * b:(i + 1) * b] for i in range(len(configs))]

  def _cache(self, cap, len_B, press, capacity):
    c = self.common
    if press is None:
      return c.full_cache(cap, len_B, capacity)
    cache, _ = c.compress(cap, len_B, c.prefill_key(), cfg=self.cfg, press=press, capacity=capacity)
    return cache

  def _decode_all(self, states, steps: int, decode_batch: int) -> list[list[int]]:
    """Greedy decoding of every (first token, cache) in shared batches; each stops at EOS."""
    import jax.numpy as jnp

    from adakv_jax.cache import KVCache

    firsts = jnp.concatenate([f for f, _ in states])
    caches = [cache for _, cache in states]
    big = KVCache(k=jnp.concatenate([x.k for x in caches], 1), v=jnp.concatenate([x.v for x in caches], 1),
                  lengths=jnp.concatenate([x.lengths for x in caches], 1),
                  pos=jnp.concatenate([x.pos for x in caches]))
    del caches, states
    out = []
    n = firsts.shape[0]
    for s in range(0, n, decode_batch):
      e = min(s + decode_batch, n)
      part = KVCache(k=big.k[:, s:e], v=big.v[:, s:e], lengths=big.lengths[:, s:e], pos=big.pos[s:e])
      out += greedy_until_eos(self.params, self.cfg, firsts[s:e], part, steps, self.eos)
    return out


def greedy_until_eos(params, cfg, first_B, cache, steps: int, eos: set) -> list[list[int]]:
  """Up to `steps` greedy tokens per sequence (the first included), EOS excluded; stops when all ended."""
  import jax
  import numpy as np

  from adakv_jax.generation import Sampling, decode_step

  tok = first_B
  host = np.asarray(tok)
  out = [[int(t)] if int(t) not in eos else [] for t in host]
  done = np.array([int(t) in eos for t in host])
  key = jax.random.PRNGKey(0)
  for _ in range(steps - 1):
    if done.all():
      break
    tok, _, cache = decode_step(params, tok, cache, key, cfg=cfg, sampling=Sampling(), backend="xla")
    host = np.asarray(tok)
    for i, t in enumerate(host):
      if not done[i]:
        done[i] = int(t) in eos
        if not done[i]:
          out[i].append(int(t))
  return out


def capture_two_windows(params, tokens_BL, len_B, len_ctx_B, *, cfg, chunk: int, window: int,
                        with_colsum: bool):
  """common.capture plus the window queries that end at the context's end (question-agnostic)."""
  return _capture_two_windows(params, tokens_BL, len_B, len_ctx_B, cfg=cfg, chunk=chunk, window=window,
                              with_colsum=with_colsum)


def _jit_capture():
  import functools

  import jax
  import jax.numpy as jnp
  from jax import lax

  from adakv_jax import model as model_lib

  @functools.partial(jax.jit, static_argnames=("cfg", "chunk", "window", "with_colsum"))
  def capture(params, tokens_BL, len_B, len_ctx_B, *, cfg, chunk, window, with_colsum):
    b, l = tokens_BL.shape
    pos_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    x = params["embed"][tokens_BL].astype(model_lib.dtype_of(cfg))

    def layer(x, lp):
      q, k, v = model_lib._qkv(lp, x, pos_BL, cfg)
      o, colsum = model_lib.chunked_causal_attention(q, k, v, len_B, chunk=chunk, with_colsum=with_colsum)
      x = model_lib._out_and_mlp(lp, x, o, cfg)
      out = dict(q_win=model_lib._window_queries(q, len_B, window),
                 q_win_ctx=model_lib._window_queries(q, len_ctx_B, window), k=k, v=v)
      if with_colsum:
        out["colsum"] = colsum
      return x, out

    x, per_layer = lax.scan(layer, x, params["layers"])
    last_BE = jnp.take_along_axis(x, (len_B - 1)[:, None, None], axis=1)[:, 0]
    return model_lib._logits(params, last_BE, cfg), per_layer

  return capture


def _capture_two_windows(*args, **kwargs):
  if "capture" not in _CACHE:
    _CACHE["capture"] = _jit_capture()
  return _CACHE["capture"](*args, **kwargs)


def verify(runner: Runner, sample: dict, gen_tokens: int) -> list[dict]:
  """The batched path against generate() on one sample: identical greedy tokens expected.

  Ada-SnapKV is checked in budget mode (B = half the prompt): in ratio mode generate() itself can
  overflow its cache (the library's per-head cap comes from the padded length; README_paper.md).
  """
  from adakv_jax.generation import generate
  from adakv_jax.press import make_press

  ctx, q = runner.encode(sample)
  half = (len(ctx) + len(q)) // 2
  presses = {("aware", "snapkv", 0.5): make_press("snapkv", compression_ratio=0.5),
             ("aware", "ada-snapkv", f"B={half}"): make_press("ada-snapkv", budget=half),
             ("agnostic", "ada-snapkv", f"B={half}"): make_press("ada-snapkv", budget=half),
             ("agnostic", "full", None): None}
  checks = list(presses)
  ours = runner.run([sample], checks, gen_tokens, decode_batch=len(checks), presses=presses)
  rows = []
  for cf, mine in zip(checks, ours):
    label = config_label(cf) if not isinstance(cf[2], str) else f"{cf[0]}/{cf[1]} {cf[2]}"
    try:
      if cf[0] == "aware":
        ref = generate(runner.params, runner.cfg, [ctx + q], max_new_tokens=gen_tokens, press=presses[cf],
                       eos_token_ids=tuple(runner.eos), backend="xla").token_ids[0]
      else:
        ref = generate(runner.params, runner.cfg, [ctx], max_new_tokens=gen_tokens, press=presses[cf],
                       eos_token_ids=tuple(runner.eos), questions=[q], backend="xla").answers[0][0]
    except Exception as e:  # noqa: BLE001 -- see the docstring
      if "capacity exhausted" not in str(e):  # arrives wrapped in a JaxRuntimeError (debug callback)
        raise
      msg = re.search(r"KV cache capacity exhausted[^;]*", str(e))
      rows.append({"config": label, "equal": None, "generate_error": msg.group(0) if msg else "",
                   "ours": runner.tok.decode(mine[0])})
      print(f"verify {label}: generate() raised CacheCapacityError")
      continue
    ref = [t for t in ref if t not in runner.eos]
    agree = next((i for i, (x, y) in enumerate(zip(mine[0], ref)) if x != y), min(len(mine[0]), len(ref)))
    rows.append({"config": label, "equal": mine[0] == ref, "agreeing_prefix": agree,
                 "ours": runner.tok.decode(mine[0]), "generate": runner.tok.decode(ref)})
    print(f"verify {label}: {'identical' if mine[0] == ref else f'first {agree} tokens agree'}")
  return rows


def main():
  a = parse_args()
  if a.replot:
    import common

    payload = common.read_json(a.out)
    print_summary(payload["summary"], sorted({s["length"] for s in payload["summary"]}))
    plot(payload, a.out)
    return
  import common
  from tqdm import tqdm

  configs = configurations(a)
  gen = {t: (SHORT_GEN[t] if a.short_gen else TOKENS_TO_GENERATE[TASKS[t]["kind"]]) for t in a.tasks}
  runner = Runner(a.model, max(a.lengths), max(gen.values()))
  rows, samples_meta, timings, checks = [], [], {}, []
  t_all = time.perf_counter()
  for length in a.lengths:
    runner.seq_len = length
    for task in tqdm(a.tasks, desc=f"RULER {length}", unit="task"):
      t0 = time.perf_counter()
      samples = [make_sample(task, i, a.seed, length, runner.count) for i in range(a.samples)]
      if a.verify and not checks:
        checks = verify(runner, samples[0], gen[task])
      outs = runner.run(samples, configs, gen[task], a.decode_batch)
      for cf, ids in zip(configs, outs):
        preds = [runner.tok.decode(x) for x in ids]
        refs = [s["outputs"] for s in samples]
        rows.append({"length": length, "task": task, "mode": cf[0], "press": cf[1], "ratio": cf[2],
                     "kept": None if cf[2] is None else round(1 - cf[2], 3), "config": config_label(cf),
                     "score": metrics.ruler_score(preds, refs),
                     "per_sample": [metrics.string_match_all(metrics.ruler_postprocess(p), r)
                                    for p, r in zip(preds, refs)],
                     "predictions": preds})
      samples_meta += [{"length": length, "task": task, "index": s["index"], "size": s["size"],
                        "prompt_tokens": runner.count(s), "outputs": s["outputs"]} for s in samples]
      timings[f"{length}/{task}"] = {"total": round(time.perf_counter() - t0, 1),
                                     **{k: round(v, 1) for k, v in runner.seconds.items()}}
      tqdm.write(f"{length}/{task}: {timings[f'{length}/{task}']}")
  summary = summarize(rows)
  payload = {"meta": common.run_meta(a, model=a.model or common.MODEL, python=sys.version,
                                     wall_s=round(time.perf_counter() - t_all, 1)),
             "tasks": {t: TASKS[t] for t in a.tasks}, "skipped_tasks": ["qa_1", "qa_2"],
             "deviations_from_ruler": DEVIATIONS, "generated_tokens": gen, "verify": checks,
             "summary": summary, "results": rows, "samples": samples_meta, "task_seconds": timings}
  common.write_json(a.out, payload)
  print_summary(summary, a.lengths)
  plot(payload, a.out)


def summarize(rows: list[dict]) -> list[dict]:
  """Per (length, config): the mean over tasks and each task's score."""
  out = {}
  for r in rows:
    key = (r["length"], r["config"])
    out.setdefault(key, {"length": r["length"], "config": r["config"], "mode": r["mode"],
                         "press": r["press"], "kept": r["kept"], "tasks": {}})["tasks"][r["task"]] = r["score"]
  for v in out.values():
    v["average"] = round(sum(v["tasks"].values()) / len(v["tasks"]), 2)
  return list(out.values())


def print_summary(summary: list[dict], lengths: list[int]) -> None:
  import common

  for length in lengths:
    part = [s for s in summary if s["length"] == length]
    tasks = list(part[0]["tasks"]) if part else []
    short = {t: t.replace("niah_", "") for t in tasks}
    print(f"\nRULER {length} tokens, score per task (%), string-match recall")
    common.print_table([{"config": s["config"], **{short[t]: s["tasks"][t] for t in tasks},
                         "avg": s["average"]} for s in part], ["config", *short.values(), "avg"])


def plot(payload: dict, name: str) -> None:
  """Per length: a config x task heatmap of scores, averages in the last column."""
  import common
  import numpy as np

  plt = common.pyplot()
  summary = payload["summary"]
  lengths = sorted({s["length"] for s in summary})
  fig, axes = plt.subplots(len(lengths), 1, figsize=(13, 0.45 * len(summary) / len(lengths) + 2.2),
                           squeeze=False)
  for ax, length in zip(axes[:, 0], lengths):
    part = [s for s in summary if s["length"] == length]
    tasks = list(part[0]["tasks"])
    grid = np.array([[s["tasks"][t] for t in tasks] + [s["average"]] for s in part])
    ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(tasks) + 1), [t.replace("niah_", "") for t in tasks] + ["AVERAGE"],
                  rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(part)), [s["config"] for s in part], fontsize=8)
    for (i, j), v in np.ndenumerate(grid):
      ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    ax.axvline(len(tasks) - 0.5, color="w", lw=2)
    ax.set_title(f"RULER (11 synthetic tasks) at {length} tokens, {payload['meta']['model']}: "
                 "string-match recall %, kept = cache fraction kept", fontsize=9)
  fig.tight_layout()
  common.save_png(fig, name)


if __name__ == "__main__":
  main()
