"""Tokenizers of the model versions this service has seen, loaded from each version's artifacts."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from llmesh.common.registry import Registry


class UnknownVersion(LookupError):
    pass


@dataclass(frozen=True)
class VersionTokenizer:
    tokenizer: Tokenizer
    context: int  # the model's maximum sequence length (prompt + generated tokens)


def load_version_tokenizer(artifact_dir: Path) -> VersionTokenizer:
    tokenizer = Tokenizer.from_file(str(artifact_dir / "tokenizer.json"))
    config = json.loads((artifact_dir / "config.json").read_text())
    context = int(config.get("n_positions") or config.get("max_position_embeddings") or 2048)
    return VersionTokenizer(tokenizer, context)


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
            loaded = await asyncio.to_thread(load_version_tokenizer, path)
            self._loaded[key] = loaded
            return loaded
