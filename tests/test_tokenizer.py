"""Tokenizer: HF-dir and GGUF constructors, chat templates, and id-for-id parity with transformers' GGUF
tokenizer."""

import json
import shutil

import pytest

from adakv_jax.checkpoints import ChatTemplateError, CheckpointError, Tokenizer, load_gguf, resolve_model
from adakv_jax.checkpoints.gguf import read_metadata
from tests.parity import tiny_hf

TEXTS = [
  "Hello world",
  " Hello world",
  "",
  "The quick brown fox jumps over the lazy dog.",
  "naïve café — déjà vu; Ünïcödé ß ø å",
  "emoji: 😀🤖👍🏽 and 🇫🇷 flags",
  "中文字符和日本語のテキスト、한국어",
  "whitespace    runs\t\ttabs\n\nnewlines \n \r\n end  ",
  "digits 1234567 and 3.14159, 1,000,000 and 0x1F",
  "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n",
  "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
  "special tokens inline <|endoftext|> <repo_name>x<file_sep>",
  "don't won't they're I'll we've she'd",
  "   leading and trailing   ",
]
CONVERSATION = [
  {"role": "user", "content": "What is Ada-KV? Answer in one line."},
  {"role": "assistant", "content": "Head-wise adaptive KV-cache eviction. 😀"},
  {"role": "user", "content": "And <b>why</b> does it help?\tThanks!"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return tiny_hf.build_numpy(tmp_path_factory.mktemp("tok") / "m", "llama_gqa_tied")


@pytest.fixture(scope="module")
def smol_meta():
  import gguf

  return read_metadata(gguf.GGUFReader(resolve_model("smollm2-135m")))


@pytest.fixture(scope="module")
def smol(smol_meta):
  return Tokenizer.from_gguf_metadata(smol_meta)


# --- behaviour without transformers ------------------------------------------------------------


def test_hf_dir_tokenizer_round_trips_text_and_reads_special_tokens(tiny_dir):
  tok = Tokenizer.from_hf_dir(tiny_dir)
  assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,)  # eos_token given as an AddedToken dict
  assert tok.vocab_size == 320
  for text in TEXTS[:10]:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
  ids = tok.encode("<|im_start|>hi<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.decode(ids, skip_special_tokens=True) == "hi"
  assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_add_bos_token_in_tokenizer_config_prepends_bos(tiny_dir, tmp_path):
  d = tmp_path / "t"
  shutil.copytree(tiny_dir, d)
  conf = json.loads((d / "tokenizer_config.json").read_text())
  conf["add_bos_token"] = True
  (d / "tokenizer_config.json").write_text(json.dumps(conf))
  tok = Tokenizer.from_hf_dir(d)
  assert tok.encode("hi")[0] == 1
  assert tok.encode("hi", add_special_tokens=False)[0] != 1


def test_generation_config_eos_ids_and_chat_template_file(tiny_dir, tmp_path):
  d = tmp_path / "t"
  shutil.copytree(tiny_dir, d)
  conf = json.loads((d / "tokenizer_config.json").read_text())
  template = conf.pop("chat_template")
  (d / "tokenizer_config.json").write_text(json.dumps(conf))
  (d / "chat_template.jinja").write_text(template)  # transformers >= 4.43 saves it beside the config
  (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  tok = Tokenizer.from_hf_dir(d)
  assert tok.chat_template == template
  assert tok.eos_token_ids == (2, 0)


def test_chat_template_renders_like_transformers_environment(tiny_dir):
  tok = Tokenizer.from_hf_dir(tiny_dir)
  text = tok.apply_chat_template(CONVERSATION[:1])
  assert text == "<|im_start|>user\nWhat is Ada-KV? Answer in one line.<|im_end|>\n<|im_start|>assistant\n"
  assert not tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=False).endswith("assistant\n")
  # transformers' globals/filters: tojson without HTML escaping, raise_exception, strftime_now, trim/lstrip
  tok.chat_template = "{{ messages | tojson }}"
  assert tok.apply_chat_template([{"role": "user", "content": "<b>&</b>"}]) == (
    '[{"role": "user", "content": "<b>&</b>"}]'
  )
  tok.chat_template = "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}ok"
  with pytest.raises(ChatTemplateError, match="one message only"):
    tok.apply_chat_template(CONVERSATION)
  tok.chat_template = "{{ strftime_now('%Y') | length }}|{{ bos_token }}"
  assert tok.apply_chat_template(CONVERSATION) == "4|<|im_start|>"
  tok.chat_template = "  {% for m in messages %}\n{{ m.role }}\n  {% endfor %}"
  assert tok.apply_chat_template(CONVERSATION[:2]) == "user\nassistant\n"  # not "  \nuser\n  \nassistant..."


def test_missing_chat_template_and_missing_tokenizer_json(tiny_dir, tmp_path):
  d = tmp_path / "t"
  shutil.copytree(tiny_dir, d)
  conf = json.loads((d / "tokenizer_config.json").read_text())
  del conf["chat_template"]
  (d / "tokenizer_config.json").write_text(json.dumps(conf))
  tok = Tokenizer.from_hf_dir(d)
  assert tok.chat_template is None
  with pytest.raises(ChatTemplateError, match="no chat_template"):
    tok.apply_chat_template(CONVERSATION)
  (d / "tokenizer.json").unlink()
  with pytest.raises(CheckpointError, match="no tokenizer.json"):
    Tokenizer.from_hf_dir(d)


def test_gguf_tokenizer_properties(smol):
  assert smol.bos_token_id == 1 and smol.eos_token_ids == (2,) and smol.vocab_size == 49152
  assert smol.chat_template.startswith("{% for message in messages %}")
  assert smol.encode("<|im_start|>user")[0] == 1  # control tokens stay whole
  assert smol.encode("hi")[0] != 1  # SmolLM2's GGUF says add_bos_token=False
  for text in TEXTS:
    assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


def test_gguf_tokenizer_survives_save_and_reload(smol, tmp_path):
  smol.save(tmp_path / "tok")
  again = Tokenizer.from_hf_dir(tmp_path / "tok")
  for text in TEXTS:
    assert again.encode(text) == smol.encode(text)
  assert again.chat_template == smol.chat_template
  assert (again.bos_token_id, again.eos_token_ids) == (smol.bos_token_id, smol.eos_token_ids)


def test_unsupported_gguf_tokenizer_model_is_named(smol_meta):
  with pytest.raises(CheckpointError, match="'llama'"):
    Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.model": "llama"})
  with pytest.raises(CheckpointError, match="no tokenizer"):
    Tokenizer.from_gguf_metadata({"general.architecture": "llama"})


# --- the chat-template split: context once, each question closing the user turn --------------------

SMOL_HEAD = (
  "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
  "<|im_end|>\n<|im_start|>user\n"
)
CONTEXT = "The Eiffel tower was designed by Gustave Eiffel's company and opened in 1889 in Paris."
QUESTIONS = ["Who designed the tower?", "When did it open? Answer with a year.", "Où est-elle ? 😀"]


def _split_around_placeholder(tok, text, questions, raw):
  """The prompt split the CLI shipped with: render a placeholder message, split the text around it."""
  if raw or tok.chat_template is None:
    return tok.encode(text), [tok.encode("\n" + q, add_special_tokens=False) for q in questions]
  if not questions:
    whole = tok.apply_chat_template([{"role": "user", "content": text}])
    return tok.encode(whole, add_special_tokens=False), []
  head, tail = tok.apply_chat_template([{"role": "user", "content": "\u0000ADAKV_CONTEXT\u0000"}]).split(
    "\u0000ADAKV_CONTEXT\u0000"
  )
  return (
    tok.encode(head + text, add_special_tokens=False),
    [tok.encode("\n\n" + q + tail, add_special_tokens=False) for q in questions],
  )


@pytest.mark.parametrize("questions", [(), QUESTIONS[:1], QUESTIONS])
@pytest.mark.parametrize("raw", [False, True])
def test_encode_chat_equals_the_placeholder_split(smol, questions, raw):
  for context in (CONTEXT, TEXTS[7], TEXTS[9]):
    ctx, qs = smol.encode_chat(context, questions, raw=raw)
    assert (ctx, qs) == _split_around_placeholder(smol, context, questions, raw)
    assert len(qs) == len(questions)


def test_context_plus_question_is_the_templated_question_aware_prompt(smol):
  ctx, qs = smol.encode_chat(CONTEXT, QUESTIONS)
  assert smol.decode(ctx, skip_special_tokens=False) == SMOL_HEAD + CONTEXT
  for q, q_ids in zip(QUESTIONS, qs):
    whole = smol.apply_chat_template([{"role": "user", "content": CONTEXT + "\n\n" + q}])
    assert ctx + q_ids == smol.encode(whole, add_special_tokens=False)
    assert smol.decode(q_ids, skip_special_tokens=False).endswith("<|im_end|>\n<|im_start|>assistant\n")
  alone, none = smol.encode_chat(CONTEXT)
  assert none == []
  assert alone == smol.encode(
    smol.apply_chat_template([{"role": "user", "content": CONTEXT}]), add_special_tokens=False
  )


def test_raw_and_template_free_prompts_are_plain_text(tiny_dir, tmp_path):
  d = tmp_path / "t"
  shutil.copytree(tiny_dir, d)
  conf = json.loads((d / "tokenizer_config.json").read_text())
  conf["add_bos_token"] = True
  del conf["chat_template"]
  (d / "tokenizer_config.json").write_text(json.dumps(conf))
  tok = Tokenizer.from_hf_dir(d)
  ctx, qs = tok.encode_chat("Hello world", ["why?"])
  assert ctx == tok.encode("Hello world") and ctx[0] == tok.bos_token_id
  assert qs == [tok.encode("\nwhy?", add_special_tokens=False)]
  with_template = Tokenizer.from_hf_dir(tiny_dir)
  assert with_template.encode_chat("Hello world", ["why?"], raw=True) == (
    with_template.encode("Hello world"),
    [with_template.encode("\nwhy?", add_special_tokens=False)],
  )


def test_chat_split_refuses_a_template_that_repeats_the_message(smol):
  head, tail = smol.chat_split()
  assert (head, tail) == (SMOL_HEAD, "<|im_end|>\n<|im_start|>assistant\n")
  tok = Tokenizer(smol.backend, chat_template="{{ messages[0].content }}|{{ messages[0].content }}")
  with pytest.raises(ChatTemplateError, match="2 times"):
    tok.encode_chat(CONTEXT, QUESTIONS)


# --- parity with transformers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_smol_tokenizer():
  transformers = pytest.importorskip("transformers")
  path = resolve_model("smollm2-135m")
  return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parity
def test_gguf_backend_is_identical_to_transformers(smol, hf_smol_tokenizer):
  ours = json.loads(smol.backend.to_str())
  ref = json.loads(hf_smol_tokenizer.backend_tokenizer.to_str())
  assert ours == ref  # vocab, merges, added tokens, pre-tokenizer, post-processor, decoder


@pytest.mark.parity
@pytest.mark.parametrize("text", TEXTS)
def test_gguf_ids_match_transformers(smol, hf_smol_tokenizer, text):
  ref = hf_smol_tokenizer(text)["input_ids"]
  assert smol.encode(text) == ref
  assert (
    smol.encode(text, add_special_tokens=False)
    == hf_smol_tokenizer(text, add_special_tokens=False)["input_ids"]
  )
  for skip in (True, False):
    assert smol.decode(ref, skip_special_tokens=skip) == hf_smol_tokenizer.decode(
      ref, skip_special_tokens=skip
    )


@pytest.mark.parity
@pytest.mark.parametrize(
  "messages",
  [CONVERSATION[:1], CONVERSATION, [{"role": "system", "content": "Be terse."}, *CONVERSATION[:2]]],
)
def test_gguf_chat_template_matches_transformers(smol, hf_smol_tokenizer, messages):
  for gen in (True, False):
    text = smol.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == hf_smol_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
  ref_ids = hf_smol_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
  assert smol.encode(smol.apply_chat_template(messages), add_special_tokens=False) == list(ref_ids)
  assert smol.bos_token_id == hf_smol_tokenizer.bos_token_id
  assert smol.eos_token_ids[0] == hf_smol_tokenizer.eos_token_id


@pytest.mark.parity
@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("qwen2", False), ("smollm", False)])
def test_synthetic_gguf_tokenizers_match_transformers(tiny_dir, tmp_path, pre, add_bos):
  # exercises what SmolLM2's file does not: split regexes, add_bos, USER_DEFINED tokens
  transformers = pytest.importorskip("transformers")
  f = tiny_hf.build_gguf(
    tmp_path / "t.gguf", tiny_dir, qtype="F32", pre=pre, add_bos=add_bos, user_defined=("<think>", "</think>")
  )
  ours = Tokenizer.from_gguf_metadata(load_gguf(f)[2])
  ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f.name)
  assert json.loads(ours.backend.to_str()) == json.loads(ref.backend_tokenizer.to_str())
  for text in TEXTS + ["<think>plan 123</think> answer", "x<think>y"]:
    assert ours.encode(text) == ref(text)["input_ids"], text
  assert ours.encode("hi")[0] == 1 if add_bos else ours.encode("hi")[0] != 1
