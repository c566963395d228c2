"""API keys, their scopes and limits, and the tokens each key used, in Redis.

A key's secret is shown once, when it is made; Redis keeps only its SHA-256 (the secrets are 256
random bits, so a fast hash is enough: nothing to brute-force).

Keys:
  llmesh:apikeys                    hash: key id -> JSON ApiKey (name, scopes, digest, limits, times)
  llmesh:apikeys:digests            hash: SHA-256 of a live secret -> key id
  llmesh:apikey:{id}:usage          hash: requests, prompt_tokens, completion_tokens
  llmesh:apikey:{id}:bucket:{kind}  hash: level, at (a token bucket; kind = requests | tokens)
"""

from __future__ import annotations

import hashlib
import secrets
import time
from enum import StrEnum

import redis.asyncio as redis
from pydantic import BaseModel, Field

from llmesh.common.registry import connect

KEYS = "llmesh:apikeys"
DIGESTS = "llmesh:apikeys:digests"
SECRET_PREFIX = "lmk"


def usage_key(key_id: str) -> str:
    return f"llmesh:apikey:{key_id}:usage"


def bucket_key(key_id: str, kind: str) -> str:
    return f"llmesh:apikey:{key_id}:bucket:{kind}"


class Scope(StrEnum):
    GENERATE = "generate"  # the Gateway service (Generate, GenerateStream, ListModels, GetModel) and Tokenizer
    READ = "read"  # the Eval service's reports, with the usage of the caller's own key only
    ADMIN = "admin"  # the Admin service (releases and rollbacks), Infer, and every key's usage in reports
    APPROVE = "approve"  # Admin's Approve and Reject: sign-off on a release that waits for approval


class ApiKey(BaseModel):
    id: str
    name: str
    scopes: list[Scope]
    digest: str
    created_at: float
    revoked_at: float = 0.0
    requests_per_second: float = Field(default=0.0, ge=0)  # 0: no limit
    tokens_per_minute: int = Field(default=0, ge=0)  # prompt + completion tokens; 0: no limit


class Usage(BaseModel):
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# A token bucket that refills at ARGV[1] per second up to ARGV[2]. Taking ARGV[3] succeeds when the
# level is at least ARGV[4] (a negative ARGV[3] gives back); returns the seconds to wait, 0 if taken.
_TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1e6
local rate, burst, cost, need = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or burst)
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or now)
level = math.min(burst, level + math.max(0, now - at) * rate)
if level < need then
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
  return tostring((need - level) / rate)
end
redis.call('HSET', KEYS[1], 'level', tostring(math.min(burst, level - cost)), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return '0'
"""


class ApiKeyStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._take = client.register_script(_TAKE)

    @classmethod
    def from_url(cls, url: str) -> ApiKeyStore:
        return cls(connect(url))

    async def close(self) -> None:
        await self.redis.aclose()

    async def create(
        self, name: str, scopes: list[Scope], requests_per_second: float = 0.0, tokens_per_minute: int = 0
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (the only time the secret exists outside the client)."""
        key_id = secrets.token_hex(6)
        secret = f"{SECRET_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        key = ApiKey(
            id=key_id,
            name=name,
            scopes=sorted(set(scopes)),
            digest=digest(secret),
            created_at=time.time(),
            requests_per_second=requests_per_second,
            tokens_per_minute=tokens_per_minute,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(KEYS, key_id, key.model_dump_json())
            pipe.hset(DIGESTS, key.digest, key_id)
            await pipe.execute()
        return key, secret

    async def list(self) -> list[ApiKey]:
        raw = await self.redis.hgetall(KEYS)
        return sorted((ApiKey.model_validate_json(v) for v in raw.values()), key=lambda k: k.created_at)

    async def get(self, key_id: str) -> ApiKey | None:
        raw = await self.redis.hget(KEYS, key_id)
        return ApiKey.model_validate_json(raw) if raw else None

    async def revoke(self, key_id: str) -> ApiKey | None:
        key = await self.get(key_id)
        if key is None:
            return None
        if not key.revoked_at:
            key.revoked_at = time.time()
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(KEYS, key_id, key.model_dump_json())
                pipe.hdel(DIGESTS, key.digest)
                await pipe.execute()
        return key

    async def find(self, secret: str) -> ApiKey | None:
        """The live key with this secret, or None."""
        key_id = await self.redis.hget(DIGESTS, digest(secret))
        key = await self.get(str(key_id)) if key_id else None
        return key if key is not None and not key.revoked_at else None

    async def take(self, key: ApiKey, kind: str, rate_per_s: float, burst: float, cost: float, need: float) -> float:
        """Take `cost` from the key's `kind` bucket if it holds `need`; the seconds to wait if not (0: taken)."""
        wait = await self._take(keys=[bucket_key(key.id, kind)], args=[rate_per_s, burst, cost, need])
        return float(wait)

    async def record_usage(self, key_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(usage_key(key_id), "requests", 1)
            pipe.hincrby(usage_key(key_id), "prompt_tokens", prompt_tokens)
            pipe.hincrby(usage_key(key_id), "completion_tokens", completion_tokens)
            await pipe.execute()

    async def usage(self, key_id: str) -> Usage:
        return Usage.model_validate(await self.redis.hgetall(usage_key(key_id)))
