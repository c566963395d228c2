"""Tokenizers of the model versions a process has seen, loaded from each version's artifacts.

The gateway encodes prompts with them, infer decodes generated tokens, tokenize serves them over
gRPC and encodes text requests that arrive on Kafka."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from tokenizers import Tokenizer

from llmesh.common.chat import ChatMessage, ChatTemplate, ChatTemplateError
from llmesh.common.registry import Registry, tokenizer_file_names
from llmesh.v1 import common_pb2, events_pb2

log = logging.getLogger("llmesh.tokenizers")


class UnknownVersion(LookupError):
    pass


class InvalidPrompt(ValueError):
    pass


@dataclass(frozen=True)
class VersionTokenizer:
    model: str
    version: int
    tokenizer: Tokenizer
    context: int  # the model's maximum sequence length (prompt + generated tokens)
    chat_template: ChatTemplate | None = None  # from tokenizer_config.json, when the version has one

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids; InvalidPrompt if it leaves no room to generate."""
        return self._fits(self.tokenizer.encode(prompt).ids)

    def encode_chat(self, messages: Sequence[ChatMessage], max_chars: int) -> list[int]:
        """The token ids of the messages rendered by the version's chat template (with the generation
        prompt), encoded without adding special tokens as transformers' apply_chat_template does;
        InvalidPrompt if there is no template, it fails, renders over `max_chars` or leaves no room."""
        if self.chat_template is None:
            raise InvalidPrompt(
                f"model {self.model}@{self.version} has no chat template; send a prompt to /v1/completions instead"
            )
        try:
            text = self.chat_template.render(messages, add_generation_prompt=True, max_chars=max_chars)
        except ChatTemplateError as err:
            raise InvalidPrompt(str(err)) from err
        return self._fits(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def _fits(self, ids: list[int]) -> list[int]:
        if not ids:
            raise InvalidPrompt("prompt encodes to no tokens")
        if len(ids) >= self.context:
            limit = self.context - 1
            raise InvalidPrompt(f"prompt is {len(ids)} tokens; model {self.model}@{self.version} takes at most {limit}")
        return ids


def tokenizer_from_files(model: str, version: int, files: Mapping[str, str]) -> VersionTokenizer:
    """A version's tokenizer from its tokenizer files; ValueError (ChatTemplateError for a template
    that does not compile) if they do not load."""
    tokenizer = Tokenizer.from_str(files["tokenizer.json"])
    config = json.loads(files["config.json"])
    context = int(config.get("n_positions") or config.get("max_position_embeddings") or 2048)
    template = None
    if (tokenizer_config := files.get("tokenizer_config.json")) is not None:
        parsed = json.loads(tokenizer_config)
        if not isinstance(parsed, dict):
            raise ValueError("tokenizer_config.json is not a JSON object")
        template = ChatTemplate.from_config(parsed)
    return VersionTokenizer(model, version, tokenizer, context, template)


def checked_tokenizer_files(model: str, version: int, files: Mapping[str, str], sha256: Mapping[str, str]) -> dict[str, str]:
    """The version's tokenizer files as stored in the registry, each checked against the sha256 of
    its release (an optional file that the release lists is required too); UnknownVersion if one is
    missing or altered. Files the release does not list are left out."""
    checked: dict[str, str] = {}
    for name in tokenizer_file_names(sha256):
        if name not in files or hashlib.sha256(files[name].encode()).hexdigest() != sha256.get(name):
            raise UnknownVersion(f"the tokenizer of {model}@{version} is missing or altered in the registry")
        checked[name] = files[name]
    return checked


class TokenizerCatalog:
    """Tokenizers by content digest, loaded from the registry (never from a folder) and checked
    against the version's sha256; `(model, version)` maps to the digest it was last seen with."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._by_digest: dict[str, VersionTokenizer] = {}
        self._digest_of: dict[tuple[str, int], str] = {}
        self._lock = asyncio.Lock()

    async def get(self, model: str, version: int) -> VersionTokenizer:
        if (digest := self._digest_of.get((model, version))) and (found := self._by_digest.get(digest)):
            # two versions (of two models, say) with the same files share one tokenizer: name the asked one
            return found if (found.model, found.version) == (model, version) else replace(found, model=model, version=version)
        return await self.refresh(model, version)

    async def refresh(self, model: str, version: int) -> VersionTokenizer:
        """The tokenizer of the version's current record (a version released again after it failed
        may have other artifacts under the same number)."""
        async with self._lock:
            record = await self.registry.version(model, version)
            if record is None or not record.digest:
                raise UnknownVersion(f"model {model} version {version} is not registered")
            if (found := self._by_digest.get(record.digest)) is None or found.model != model or found.version != version:
                stored = await self.registry.tokenizer_files(record.digest)
                files = checked_tokenizer_files(model, version, stored, record.sha256)
                found = await asyncio.to_thread(tokenizer_from_files, model, version, files)
                self._by_digest[record.digest] = found
            self._digest_of[(model, version)] = record.digest
            return found

    async def follow(self, status: events_pb2.ModelStatusEvent, holder: str) -> None:
        """Keep up with infer's status events: preload a staged version; forget a failed one (the
        next request reads its record again)."""
        if status.state == common_pb2.VERSION_STATE_STAGED:
            await self.preload(status.model, status.version, holder)
        elif status.state == common_pb2.VERSION_STATE_FAILED:
            self._digest_of.pop((status.model, status.version), None)

    async def preload(self, model: str, version: int, holder: str) -> None:
        """Load a staged version's tokenizer before it is routed to, and tell the registry (infer
        waits for a holder before it flips routing, so no request pays for the load)."""
        try:
            found = await self.refresh(model, version)
        except (UnknownVersion, OSError, ValueError) as err:
            log.warning("could not preload a tokenizer", extra={"model": model, "version": version, "error": str(err)})
            return
        await self.registry.mark_tokenizer_loaded(self._digest_of[(found.model, found.version)], holder)
