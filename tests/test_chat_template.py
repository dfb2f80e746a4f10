"""Checkpoints' own Jinja chat templates: rendered as transformers renders them, used by the console's cache.

The templates below are test data written from the models' published tokenizer_config.json templates
(Llama 3 Instruct, Qwen2 Instruct with its default system prompt, Mistral Instruct v0.1/v0.2, and a
Qwen2.5-style template with a tools branch).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from tiny_model import GREEDY, make_tiny_model_dir
from tiny_tokenizer import write_tiny_hf_tokenizer

from engine.build import build_engine
from engine.config import DeviceSpec, RunConfig
from llama.chat import ChatSession
from llama.chat_format import Message
from llama.chat_template import JinjaChatFormat, find_chat_template, token_strings
from llama.errors import UserError
from llama.generation import Generation
from llama.sampling import Sampler
from llama.tokenizer import load_tokenizer

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
TOOLS = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, a helpful assistant.' }}\n"
    "    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n"
    "{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\") %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
TOKENS = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}  # both in the tiny tokenizer's vocabulary
TEMPLATES = {"llama3": LLAMA3, "qwen2": QWEN2, "mistral": MISTRAL, "tools": TOOLS}
ONE_TURN = [Message("user", "Hello there, café?")]
WITH_SYSTEM = [Message("system", "You are brief."), Message("user", "Hi")]
MULTI_TURN = [Message("user", "Hi"), Message("assistant", " Hello! How can I help?"),
              Message("user", "Tell me\na joke")]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("template-tok")
    write_tiny_hf_tokenizer(d)
    return d


def _theirs(hf_dir, template: str):
    transformers = pytest.importorskip("transformers")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), **TOKENS)
    tok.chat_template = template
    return tok


def _ours(hf_dir, template: str) -> JinjaChatFormat:
    return JinjaChatFormat(load_tokenizer(hf_dir), template, "test", TOKENS)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("dialog", [ONE_TURN, WITH_SYSTEM, MULTI_TURN], ids=["one", "system", "multi"])
def test_rendered_prompts_equal_transformers(hf_dir, name, dialog):
    if name == "mistral" and dialog is WITH_SYSTEM:
        dialog = dialog[1:]  # that template refuses system messages
    theirs = _theirs(hf_dir, TEMPLATES[name])
    ours = _ours(hf_dir, TEMPLATES[name])
    dicts = [{"role": m.role, "content": m.content} for m in dialog]
    text = theirs.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
    assert ours.render(dialog) == text
    ids = theirs.apply_chat_template(dicts, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.encode_dialog(dialog) == list(ids)


@pytest.mark.parametrize("name", ["llama3", "qwen2", "mistral"])
def test_followups_extend_the_dialog_exactly(hf_dir, name):
    fmt = _ours(hf_dir, TEMPLATES[name])
    dialog = [Message("user", "Hi")]
    reply = "Hello! How can I help?"
    whole = fmt.encode_dialog(dialog + [Message("assistant", reply), Message("user", "A joke")])
    pieces = fmt.encode_dialog(dialog) + fmt.tokenizer.encode(reply) + fmt.encode_followup(Message("user", "A joke"))
    assert pieces == whole
    assert fmt.stop_ids >= set(fmt.assistant_end_ids) and len(fmt.assistant_end_ids) == (name != "llama3")


def test_template_errors_are_one_line_naming_the_file(hf_dir):
    with pytest.raises(UserError, match="test: the chat template failed to render.*must alternate"):
        _ours(hf_dir, MISTRAL).render([Message("user", "a"), Message("user", "b")])
    with pytest.raises(UserError, match="test: the chat template is not valid Jinja"):
        _ours(hf_dir, "{% for m in messages %}")


def test_template_sources_and_the_console_cache(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path)
    assert find_chat_template(model_dir) is None
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": MISTRAL}]}))
    assert find_chat_template(model_dir) == (MISTRAL, str(model_dir / "tokenizer_config.json"))
    (model_dir / "chat_template.jinja").write_text(MISTRAL)
    assert find_chat_template(model_dir)[1].endswith("chat_template.jinja")
    cfg = RunConfig(model_dir=model_dir, device=DeviceSpec("cpu"), dtype="float32", ctx=256, sampling=GREEDY)
    engine = build_engine(cfg)
    assert isinstance(engine.chat_format, JinjaChatFormat)
    assert token_strings(model_dir, engine.tokenizer) == {"bos_token": "<s>", "eos_token": "</s>"}
    assert build_engine(replace(cfg, chat_format="llama2")).chat_format.name == "llama2"
    session = ChatSession(engine.generator, engine.chat_format)
    first, second = Generation(), Generation()
    for _ in session.reply("hello there", Sampler(GREEDY), 5, first):
        pass
    for _ in session.reply("how are you", Sampler(GREEDY), 5, second):
        pass
    followup = engine.chat_format.encode_followup(Message("user", "how are you"))
    assert second.stats.prefilled_tokens == len(followup) + (first.stats.stop_reason == "length")
