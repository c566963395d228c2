"""Tokenizers of the model versions a process has seen, loaded from each version's artifacts.

The gateway encodes prompts with them, infer decodes generated tokens, tokenize serves them over
gRPC and encodes text requests that arrive on Kafka."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from llmesh.common.registry import Registry

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

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids; InvalidPrompt if it leaves no room to generate."""
        ids: list[int] = self.tokenizer.encode(prompt).ids
        if not ids:
            raise InvalidPrompt("prompt encodes to no tokens")
        if len(ids) >= self.context:
            limit = self.context - 1
            raise InvalidPrompt(f"prompt is {len(ids)} tokens; model {self.model}@{self.version} takes at most {limit}")
        return ids


def load_version_tokenizer(model: str, version: int, artifact_dir: Path) -> VersionTokenizer:
    tokenizer = Tokenizer.from_file(str(artifact_dir / "tokenizer.json"))
    config = json.loads((artifact_dir / "config.json").read_text())
    context = int(config.get("n_positions") or config.get("max_position_embeddings") or 2048)
    return VersionTokenizer(model, version, tokenizer, context)


class TokenizerCatalog:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._loaded: dict[tuple[str, int], VersionTokenizer] = {}
        self._lock = asyncio.Lock()

    async def get(self, model: str, version: int) -> VersionTokenizer:
        key = (model, version)
        if found := self._loaded.get(key):
            return found
        async with self._lock:
            if found := self._loaded.get(key):
                return found
            record = await self.registry.version(model, version)
            if record is None or not record.artifact_uri:
                raise UnknownVersion(f"model {model} version {version} is not registered")
            path = Path(record.artifact_uri.removeprefix("file://"))
            loaded = await asyncio.to_thread(load_version_tokenizer, model, version, path)
            self._loaded[key] = loaded
            return loaded

    async def preload(self, model: str, version: int, holder: str) -> None:
        """Load a staged version's tokenizer before it is routed to, and tell the registry (infer
        waits for a holder before it flips routing, so no request pays for the load)."""
        try:
            await self.get(model, version)
        except (UnknownVersion, OSError, ValueError) as err:
            log.warning("could not preload a tokenizer", extra={"model": model, "version": version, "error": str(err)})
            return
        await self.registry.mark_tokenizer_loaded(model, version, holder)
