"""Tokenizer: a `tokenizers.Tokenizer` plus what transformers keeps beside it (special tokens, chat template).

Built either from a transformers dir (tokenizer.json + tokenizer_config.json) or from a GGUF file's metadata.
The GGUF path replays transformers' GGUF converter (integrations/gguf/gguf_tokenizer_mapping.py, GPT2Tokenizer
and TokenizersBackend.update_post_processor) so ids are identical to
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` without importing transformers.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from adakv_jax.checkpoints.errors import CheckpointError


class ChatTemplateError(ValueError):
  """The tokenizer has no chat template, or the template refused the conversation."""


# --- GGUF -> tokenizers (mirrors transformers.integrations.gguf.gguf_tokenizer_mapping) ---------------

_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
  r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
  r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
  r"|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex; any other value (e.g. SmolLM2's "smollm") keeps GPT-2's ByteLevel regex.
GGUF_PRE_TOKENIZER_SPLITS = {
  **dict.fromkeys(
    [
      "llama3",
      "llama-v3",
      "llama-bpe",
      "falcon3",
      "falcon-h1",
      "pixtral",
      "midm-2.0",
      "lfm2",
      "jina-v5-nano",
      "dbrx",
      "smaug-bpe",
    ],
    _LLAMA3_SPLIT,
  ),
  "tekken": _TEKKEN_SPLIT,
  **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
  "qwen35": _QWEN35_SPLIT,
  **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table."""
  bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def _byte_level_backend(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
  """transformers' byte_level_tokenizer: GPT2Tokenizer(vocab, merges) with GPT-2's defaults."""
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {
    tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
    for i, tok in enumerate(meta["tokenizer.ggml.tokens"])
  }
  if "tokenizer.ggml.merges" not in meta:
    raise CheckpointError("GGUF byte-level (gpt2) tokenizer without tokenizer.ggml.merges is not supported")
  merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
  tok = tokenizers.Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=merges,
      dropout=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
    )
  )
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  # GPT2Tokenizer's own default special token, added whether or not the file has it (it usually does).
  tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
  return tok


def _add_gguf_special_tokens(tok: tokenizers.Tokenizer, meta: Mapping[str, Any], byte_level: bool) -> None:
  """CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens (kept whole)."""
  tokens = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type") or ()
  spelled = set(bytes_to_unicode().values()) if byte_level else None
  control = [
    AddedToken(t, normalized=False, special=True)
    for t, ty in zip(tokens, types)
    if ty == CONTROL and (spelled is None or set(t) <= spelled)
  ]
  if control:
    tok.add_special_tokens(control)
  vocab = tok.get_vocab()
  user = [
    AddedToken(t, normalized=False, special=False)
    for t, ty in zip(tokens, types)
    if ty == USER_DEFINED and t in vocab
  ]
  if user:
    tok.add_tokens(user)


def _template_post_processor(
  bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
  """Same template TokenizersBackend.update_post_processor writes."""
  add_bos = add_bos and bos is not None
  add_eos = add_eos and eos is not None
  single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
  pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
  special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
  return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


# --- chat templates (mirrors transformers.utils.chat_template_utils._compile_jinja_template) ------------


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str):
  import jinja2
  from jinja2.ext import loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.now().strftime(fmt)

  class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it for assistant
    masks)."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


def _token_str(value) -> str | None:
  """tokenizer_config.json spells special tokens as strings or as AddedToken dicts."""
  if isinstance(value, dict):
    return value.get("content")
  return value


class Tokenizer:
  """Text <-> ids, special token ids and the chat template; backed by a `tokenizers.Tokenizer`."""

  def __init__(
    self,
    backend: tokenizers.Tokenizer,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    unk_token: str | None = None,
    pad_token: str | None = None,
    chat_template: str | None = None,
    extra_eos_token_ids: Sequence[int] = (),
  ):
    self.backend = backend
    self.bos_token, self.eos_token, self.unk_token, self.pad_token = (
      bos_token,
      eos_token,
      unk_token,
      pad_token,
    )
    self.chat_template = chat_template
    self._extra_eos = tuple(int(i) for i in extra_eos_token_ids)

  # --- properties ---
  @property
  def bos_token_id(self) -> int | None:
    return self.backend.token_to_id(self.bos_token) if self.bos_token is not None else None

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    """eos_token's id first, then any other ids that end generation (generation_config, GGUF eot)."""
    first = [self.backend.token_to_id(self.eos_token)] if self.eos_token is not None else []
    return tuple(dict.fromkeys(i for i in first + list(self._extra_eos) if i is not None))

  @property
  def vocab_size(self) -> int:
    """Ids in use, added tokens included (can be below the model's padded embedding rows)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  # --- text ---
  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of `text`; pass add_special_tokens=False for a rendered chat prompt (as transformers does)."""
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """Renders `messages` with the model's Jinja chat template, with transformers' globals and filters."""
    import jinja2

    if not self.chat_template:
      raise ChatTemplateError("this tokenizer has no chat_template; format the prompt yourself")
    if not messages:
      raise ChatTemplateError("cannot apply a chat template to an empty conversation")
    specials = {
      k: v
      for k, v in (
        ("bos_token", self.bos_token),
        ("eos_token", self.eos_token),
        ("unk_token", self.unk_token),
        ("pad_token", self.pad_token),
      )
      if v is not None
    }
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    try:
      return _compile_chat_template(self.chat_template).render(
        messages=chat,
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **{**specials, **kwargs},
      )
    except jinja2.TemplateError as e:
      raise ChatTemplateError(f"chat template failed: {e}") from None

  def chat_split(self) -> tuple[str, str]:
    """(text before, text after) a single user message in the chat template, generation prompt included.

    Rendering a marker in place of the message, rather than applying the template to each prompt, lets a
    context be encoded once and each question closing the turn after it be encoded on its own.
    """
    marker = "\u0000ADAKV_USER_MESSAGE\u0000"
    rendered = self.apply_chat_template([{"role": "user", "content": marker}])
    if rendered.count(marker) != 1:
      raise ChatTemplateError(
        f"the chat template renders a user message {rendered.count(marker)} times, "
        "so the prompt cannot be split around it"
      )
    head, tail = rendered.split(marker)
    return head, tail

  def encode_chat(
    self, context: str, questions: Sequence[str] = (), *, raw: bool = False
  ) -> tuple[list[int], list[list[int]]]:
    """(context ids, [ids of each question]) where context + question is the question-aware prompt.

    With the chat template, the context ids open the user turn and each question's ids close it
    ("\\n\\n" + question + the template's tail, ending in the generation prompt); without questions the
    context ids are the whole templated turn. context + question equals the template applied to
    context + "\\n\\n" + question, id for id, unless the context ends in whitespace (which the whole string
    would merge with the "\\n\\n" into one token). With `raw=True`, or a tokenizer without a template, the
    context is encoded as plain text (special tokens per the tokenizer, e.g. BOS) and each question as
    "\\n" + question. The question ids can therefore also follow a compressed context
    (question-agnostic compression).
    """
    questions = list(questions)
    if raw or self.chat_template is None:
      return self.encode(context), [self.encode("\n" + q, add_special_tokens=False) for q in questions]
    if not questions:
      return self.encode(
        self.apply_chat_template([{"role": "user", "content": context}]), add_special_tokens=False
      ), []
    head, tail = self.chat_split()
    return (
      self.encode(head + context, add_special_tokens=False),
      [self.encode("\n\n" + q + tail, add_special_tokens=False) for q in questions],
    )

  # --- constructors ---
  @classmethod
  def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
    """From tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json if
    present)."""
    path = Path(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
      raise CheckpointError(f"{str(path)!r} has no tokenizer.json (only fast-tokenizer files are supported)")
    try:
      backend = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise CheckpointError(f"{tok_file} is not a valid tokenizers file: {e}") from None
    conf = _read_json(path / "tokenizer_config.json")
    template = conf.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one is the chat template
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (path / "chat_template.jinja").is_file():
      template = (path / "chat_template.jinja").read_text()
    if template is None:
      template = _read_json(path / "chat_template.json").get("chat_template")
    bos, eos = _token_str(conf.get("bos_token")), _token_str(conf.get("eos_token"))
    if "add_bos_token" in conf or "add_eos_token" in conf:  # transformers rebuilds the post-processor then
      backend.post_processor = _template_post_processor(
        bos,
        backend.token_to_id(bos) if bos else None,
        eos,
        backend.token_to_id(eos) if eos else None,
        bool(conf.get("add_bos_token")),
        bool(conf.get("add_eos_token")),
      )
    extra = list(conf.get("eos_token_ids", []))  # written by save()
    gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
    if gen_eos is not None:
      extra += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    return cls(
      backend,
      bos_token=bos,
      eos_token=eos,
      unk_token=_token_str(conf.get("unk_token")),
      pad_token=_token_str(conf.get("pad_token")),
      chat_template=template,
      extra_eos_token_ids=extra,
    )

  @classmethod
  def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
    """From `tokenizer.ggml.*` metadata (as load_gguf returns it), ids identical to transformers'
    converter."""
    if "tokenizer.ggml.tokens" not in meta:
      raise CheckpointError("GGUF metadata has no tokenizer.ggml.tokens: the file carries no tokenizer")
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise CheckpointError(
        f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, tokenizer.ggml.model='gpt2')"
      )
    tokens = meta["tokenizer.ggml.tokens"]
    backend = _byte_level_backend(meta)
    _add_gguf_special_tokens(backend, meta, byte_level=True)
    split = GGUF_PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
      backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
          pre_tokenizers.Split(Regex(split), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
      )

    def named(key):
      i = meta.get(f"tokenizer.ggml.{key}")
      return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, unk, pad = (
      named("bos_token_id"),
      named("eos_token_id"),
      named("unknown_token_id"),
      named("padding_token_id"),
    )
    # the named special tokens are special added tokens too (TokenizersBackend._post_init)
    backend.add_special_tokens(
      [AddedToken(t, special=True, normalized=False) for t in (bos, eos, unk, pad) if t]
    )
    backend.post_processor = _template_post_processor(
      bos,
      backend.token_to_id(bos) if bos else None,
      eos,
      backend.token_to_id(eos) if eos else None,
      bool(meta.get("tokenizer.ggml.add_bos_token", False)),
      bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    eot = meta.get("tokenizer.ggml.eot_token_id")
    return cls(
      backend,
      bos_token=bos,
      eos_token=eos,
      unk_token=unk,
      pad_token=pad,
      chat_template=meta.get("tokenizer.chat_template"),
      extra_eos_token_ids=[eot] if eot is not None else [],
    )

  def save(self, path: str | os.PathLike) -> None:
    """Writes tokenizer.json + tokenizer_config.json that `from_hf_dir` reads back to an equal tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(self.backend.to_str())
    conf = {
      "bos_token": self.bos_token,
      "eos_token": self.eos_token,
      "unk_token": self.unk_token,
      "pad_token": self.pad_token,
      "chat_template": self.chat_template,
      "eos_token_ids": list(self.eos_token_ids),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False))


def _read_json(file: Path) -> dict:
  if not file.is_file():
    return {}
  try:
    out = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file} is not valid JSON: {e}") from None
  return out if isinstance(out, dict) else {}
