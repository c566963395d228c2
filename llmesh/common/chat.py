"""Chat messages and the chat template that turns them into a model version's prompt.

The template is the `chat_template` of the version's tokenizer_config.json, rendered as Hugging Face
transformers renders it (`apply_chat_template(..., tokenize=False)`: transformers/utils/chat_template_utils.py,
`_compile_jinja_template` and `render_jinja_template`): the same sandboxed Jinja environment, globals
and `tojson` filter, the same template variables (messages, tools, documents, add_generation_prompt
and the special tokens)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, NoReturn

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, field_validator

Role = Literal["system", "developer", "user", "assistant", "tool"]
MESSAGE_LIMIT = 300  # characters of a template's error message passed on


class TextPart(BaseModel):
    """One part of a message's content in OpenAI's format; only text parts are accepted."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Role
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: object) -> object:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, Mapping) else getattr(part, "type", None)
                if kind != "text":
                    raise ValueError(f"content part of type {kind!r} is not supported: only text parts are")
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatTemplateError(ValueError):
    """The template does not compile or does not render these messages (the message is short, no traceback)."""


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' filter: unlike Jinja's own it does not escape HTML characters
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Generation(jinja2.ext.Extension):
    # transformers' `{% generation %}` tag marks assistant text for its token masks; rendered, it is its body
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    # transformers' `dict` global: no attribute of the dict type itself reaches the template
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # transformers' `namespace` global: it refuses underscore-prefixed attributes
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' ({name!r})")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _short(err: Exception) -> str:
    if isinstance(err, jinja2.TemplateSyntaxError):
        text = f"chat template syntax error at line {err.lineno}: {err.message}"
    elif isinstance(err, jinja2.exceptions.SecurityError):
        text = f"chat template refused by the sandbox: {err}"
    elif type(err) is jinja2.exceptions.TemplateError:  # raise_exception() in the template
        text = f"chat template refused the conversation: {err}"
    else:
        text = f"chat template failed: {type(err).__name__}: {err}"
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """The special tokens transformers passes to a template: every `*_token` of the config (a string
    or an AddedToken `{"content": ...}`) and the named `extra_special_tokens` / `model_specific_special_tokens`."""
    named = {key: value for key, value in config.items() if key.endswith("_token")}
    for extra in ("extra_special_tokens", "model_specific_special_tokens"):
        if isinstance(more := config.get(extra), Mapping):
            named.update(more)
    tokens: dict[str, str] = {}
    for key, value in named.items():
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            tokens[str(key)] = value
    return tokens


class ChatTemplate:
    def __init__(self, source: str, tokens: Mapping[str, str] | None = None) -> None:
        """Compile `source` once; ChatTemplateError if it is not a valid template."""
        self.source = source
        self.tokens = dict(tokens or {})
        try:
            self._template = _environment().from_string(source)
        except Exception as err:
            raise ChatTemplateError(_short(err)) from err

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ChatTemplate | None:
        """The template of a parsed tokenizer_config.json (None without one). Like transformers, a
        list of named templates `[{"name", "template"}]` or a dict of them gives the one named 'default'."""
        source = config.get("chat_template")
        if source is None:
            return None
        if isinstance(source, list):
            try:
                source = {item["name"]: item["template"] for item in source}
            except (TypeError, KeyError) as err:
                raise ChatTemplateError("chat_template is a list that is not of {name, template} entries") from err
        if isinstance(source, dict):
            if "default" not in source:
                raise ChatTemplateError(f"chat_template has several templates and none named 'default' ({sorted(source)})")
            source = source["default"]
        if not isinstance(source, str):
            raise ChatTemplateError("chat_template is not a string")
        return cls(source, special_tokens(config))

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True, max_chars: int = 1_000_000) -> str:
        """The prompt text; ChatTemplateError if the template fails or renders more than `max_chars`."""
        chat = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name is not None else {}) for m in messages]
        rendered: list[str] = []
        size = 0
        try:
            for chunk in self._template.generate(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **self.tokens
            ):
                size += len(chunk)
                if size > max_chars:
                    raise ChatTemplateError(f"the chat template renders more than {max_chars} characters")
                rendered.append(chunk)
        except ChatTemplateError:
            raise
        except Exception as err:
            raise ChatTemplateError(_short(err)) from err
        return "".join(rendered)
