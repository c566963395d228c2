"""Chat templates render as transformers renders them, inside the sandbox, and reach the tokenizer
catalog only as the release's sha256 says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from llmesh.common.chat import ChatMessage, ChatTemplate, ChatTemplateError
from llmesh.common.events import content_digest
from llmesh.common.registry import Registry, VersionRecord
from llmesh.common.tokenizers import (
    InvalidPrompt,
    TokenizerCatalog,
    UnknownVersion,
    checked_tokenizer_files,
    tokenizer_from_files,
)
from llmesh.lm.build import DEMO_CHAT_TEMPLATE, EOS, train_tokenizer

CHATML = (  # Qwen2's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (  # Llama 3's headers, with Llama 2's check that the roles alternate
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + messages[0]['content'] | trim + '<|eot_id|>' }}"
    "{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
TOJSON = """{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% set ns.count = ns.count + 1 %}
    {{ message | tojson }}
{% endfor %}
{% if add_generation_prompt %}
{{ {"next": "assistant", "seen": ns.count, "eos": eos_token, "text": "é <b>&"} | tojson(sort_keys=true) }}
{% endif %}"""
ADDED_BOS = {
    "__type": "AddedToken",
    "content": "<|begin_of_text|>",
    "lstrip": False,
    "normalized": False,
    "rstrip": False,
    "single_word": False,
    "special": True,
}
TEMPLATES: dict[str, dict[str, Any]] = {
    "demo": {"chat_template": DEMO_CHAT_TEMPLATE, "bos_token": EOS, "eos_token": EOS, "unk_token": EOS},
    "chatml": {"chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "llama3": {"chat_template": LLAMA3, "bos_token": ADDED_BOS, "eos_token": "<|eot_id|>"},
    "tojson": {
        "chat_template": [{"name": "default", "template": TOJSON}, {"name": "tool_use", "template": "x"}],
        "eos_token": "</s>",
    },
}
PARTS = {"role": "user", "content": [{"type": "text", "text": "Return the "}, {"type": "text", "text": "number of"}]}
CONVERSATIONS = {
    "one user": [{"role": "user", "content": "Return the number of"}],
    "system user assistant user": [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Return the number of items."},
        {"role": "assistant", "content": " 3 items, 'quoted' <tags> & \"more\""},
        {"role": "user", "content": "Return the size\nof the café."},
    ],
    "text parts": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, PARTS],
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(("Return the number of items in the list.\n" * 30) + EOS, vocab_size=300)


def _folder(root: Path, tokenizer: Tokenizer, config: dict[str, Any] | None) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    files = {"tokenizer.json": tokenizer.to_str(), "config.json": json.dumps({"n_positions": 64})}
    if config is not None:
        files["tokenizer_config.json"] = json.dumps(config)
    for name, text in files.items():
        (root / name).write_text(text)
    return files


def _hf_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a caller of transformers would pass for the same conversation: text parts joined."""
    return [{**m, "content": ChatMessage.model_validate(m).text()} for m in messages]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_renders_as_transformers(tokenizer: Tokenizer, tmp_path: Path, name: str, conversation: str) -> None:
    config = TEMPLATES[name]
    _folder(tmp_path, tokenizer, config)
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)  # a local folder: nothing is downloaded
    messages = CONVERSATIONS[conversation]
    template = ChatTemplate.from_config(config)
    assert template is not None
    ours = template.render([ChatMessage.model_validate(m) for m in messages])
    expected = hf.apply_chat_template(_hf_messages(messages), tokenize=False, add_generation_prompt=True)
    assert ours == expected
    without = template.render([ChatMessage.model_validate(m) for m in messages], add_generation_prompt=False)
    assert without == hf.apply_chat_template(_hf_messages(messages), tokenize=False, add_generation_prompt=False)


def test_template_variables(tokenizer: Tokenizer) -> None:
    llama = ChatTemplate.from_config(TEMPLATES["llama3"])
    assert llama is not None and llama.tokens["bos_token"] == "<|begin_of_text|>"  # an AddedToken dict
    rendered = llama.render([ChatMessage(role="user", content="hi")])
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>user")
    tojson = ChatTemplate.from_config(TEMPLATES["tojson"])
    assert tojson is not None and '"text": "é <b>&"' in tojson.render([ChatMessage(role="user", content="hi")])


def test_demo_template_is_plain_text() -> None:
    demo = ChatTemplate(DEMO_CHAT_TEMPLATE)
    assert demo.render([ChatMessage(role="user", content="Return the number of")]) == "Return the number of"
    messages = [ChatMessage.model_validate(m) for m in CONVERSATIONS["system user assistant user"]]
    assert demo.render(messages).split("\n")[:2] == ["Answer in one line.", "Return the number of items."]


def test_bad_role_order_raises_the_templates_message() -> None:
    llama = ChatTemplate.from_config(TEMPLATES["llama3"])
    assert llama is not None
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        llama.render([ChatMessage(role="user", content="a"), ChatMessage(role="user", content="b")])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__['os'] }}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
    ],
)
def test_sandbox_escapes_are_refused(source: str) -> None:
    with pytest.raises(ChatTemplateError, match="sandbox") as caught:
        ChatTemplate(source).render([ChatMessage(role="user", content="hi")])
    assert "Traceback" not in str(caught.value) and "\n" not in str(caught.value)


def test_errors_are_short_chat_template_errors() -> None:
    hi = [ChatMessage(role="user", content="hi")]
    with pytest.raises(ChatTemplateError, match=r": x$"):
        ChatTemplate("{{ raise_exception('x') }}").render(hi)
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% for %}")
    with pytest.raises(ChatTemplateError, match="UndefinedError"):
        ChatTemplate("{{ nothing.here }}").render(hi)
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        ChatTemplate.from_config({"chat_template": {"tool_use": "x"}})
    assert ChatTemplate.from_config({"eos_token": "</s>"}) is None


def test_output_is_bounded() -> None:
    hi = [ChatMessage(role="user", content="hi")]
    loop = ChatTemplate("{% for i in range(100000) %}{{ messages[0].content * 50 }}{% endfor %}")
    with pytest.raises(ChatTemplateError, match="more than 1000 characters"):
        loop.render(hi, max_chars=1000)
    assert ChatTemplate(DEMO_CHAT_TEMPLATE).render(hi, max_chars=2) == "hi"


def test_messages_take_text_parts_only() -> None:
    assert ChatMessage.model_validate(PARTS).text() == "Return the number of"
    with pytest.raises(ValidationError, match="'image_url' is not supported"):
        ChatMessage.model_validate({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]})
    with pytest.raises(ValidationError):
        ChatMessage.model_validate({"role": "robot", "content": "hi"})


def test_tokenizer_from_files_with_and_without_a_config(tokenizer: Tokenizer, tmp_path: Path) -> None:
    plain = tokenizer_from_files("m", 1, _folder(tmp_path / "a", tokenizer, None))
    assert plain.chat_template is None
    with pytest.raises(InvalidPrompt, match=r"^model m@1 has no chat template; send a prompt to /v1/completions instead$"):
        plain.encode_chat([ChatMessage(role="user", content="hi")], max_chars=1000)
    no_template = tokenizer_from_files("m", 1, _folder(tmp_path / "b", tokenizer, {"eos_token": EOS}))
    assert no_template.chat_template is None

    demo = tokenizer_from_files("m", 2, _folder(tmp_path / "c", tokenizer, TEMPLATES["demo"]))
    assert demo.chat_template is not None
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Return the number of")]
    text = demo.chat_template.render(messages)
    assert demo.encode_chat(messages, max_chars=1000) == tokenizer.encode(text, add_special_tokens=False).ids
    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path / "c")
    assert demo.encode_chat(messages, max_chars=1000) == hf.apply_chat_template(
        [m.model_dump(exclude_none=True) for m in messages], add_generation_prompt=True, return_dict=False
    )


def test_encode_chat_checks_like_encode_prompt(tokenizer: Tokenizer, tmp_path: Path) -> None:
    demo = tokenizer_from_files("m", 2, _folder(tmp_path, tokenizer, TEMPLATES["demo"]))
    with pytest.raises(InvalidPrompt, match="no tokens"):
        demo.encode_chat([ChatMessage(role="user", content="")], max_chars=1000)
    with pytest.raises(InvalidPrompt, match="takes at most 63"):
        demo.encode_chat([ChatMessage(role="user", content="Return the number of items. " * 40)], max_chars=10_000)
    with pytest.raises(InvalidPrompt, match="more than 10 characters"):
        demo.encode_chat([ChatMessage(role="user", content="Return the number of items.")], max_chars=10)
    broken = tokenizer_from_files(
        "m", 3, _folder(tmp_path / "x", tokenizer, {"chat_template": "{{ raise_exception('no chat') }}"})
    )
    with pytest.raises(InvalidPrompt, match="no chat"):
        broken.encode_chat([ChatMessage(role="user", content="hi")], max_chars=1000)


def _sha256(files: dict[str, str]) -> dict[str, str]:
    return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in files.items()}


def test_checked_tokenizer_files(tokenizer: Tokenizer, tmp_path: Path) -> None:
    files = _folder(tmp_path, tokenizer, TEMPLATES["demo"])
    sha256 = {**_sha256(files), "model.safetensors": "0" * 64}
    assert checked_tokenizer_files("m", 1, files, sha256) == files
    altered = {**files, "tokenizer_config.json": json.dumps({**TEMPLATES["demo"], "chat_template": "{{ 'x' }}"})}
    with pytest.raises(UnknownVersion, match="missing or altered"):
        checked_tokenizer_files("m", 1, altered, sha256)
    missing = {k: v for k, v in files.items() if k != "tokenizer_config.json"}
    with pytest.raises(UnknownVersion, match="missing or altered"):
        checked_tokenizer_files("m", 1, missing, sha256)
    # a version released without the file loads, and an unlisted copy of it is never used
    unlisted = {k: v for k, v in sha256.items() if k != "tokenizer_config.json"}
    assert checked_tokenizer_files("m", 1, files, unlisted) == missing


class FakeRegistry:
    def __init__(self, files: dict[str, str], sha256: dict[str, str]) -> None:
        self.files, self.record = files, VersionRecord(version=1, sha256=sha256, digest=content_digest(sha256))

    async def version(self, model: str, version: int) -> VersionRecord | None:
        return self.record if (model, version) == ("m", 1) else None

    async def tokenizer_files(self, digest: str) -> dict[str, str]:
        return dict(self.files) if digest == self.record.digest else {}


async def test_catalog_checks_the_config_digest(tokenizer: Tokenizer, tmp_path: Path) -> None:
    files = _folder(tmp_path, tokenizer, TEMPLATES["demo"])
    loaded = await TokenizerCatalog(cast(Registry, FakeRegistry(files, _sha256(files)))).refresh("m", 1)
    assert loaded.chat_template is not None
    altered = {**files, "tokenizer_config.json": files["tokenizer_config.json"].replace("system", "user")}
    with pytest.raises(UnknownVersion, match="altered"):
        await TokenizerCatalog(cast(Registry, FakeRegistry(altered, _sha256(files)))).refresh("m", 1)
    without = {k: v for k, v in files.items() if k != "tokenizer_config.json"}
    plain = await TokenizerCatalog(cast(Registry, FakeRegistry(without, _sha256(without)))).refresh("m", 1)
    assert plain.chat_template is None
