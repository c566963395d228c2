"""Joins the primary's and the candidate's answers to one request (a Redis buffer with a TTL, so any
eval replica can complete a pair), and keeps the scores of each candidate.

Keys:
  llmesh:eval:join:{request_id}        hash: primary, candidate (JSON sides); expires after join_ttl_s
  llmesh:eval:join:deadlines           sorted set: request id -> when it counts as missing
  llmesh:eval:scores:{model}:{version} list of JSON PairScore (newest last, capped); a scenario's shadow
                                       template versions under the model name scenario/{name}
  llmesh:eval:missing:{model}:{version} counter of requests whose other side never came
  llmesh:eval:late:{model}:{version}   counter of sides that came after their pair was counted missing
  llmesh:eval:join:expired:{request_id} marks a request counted missing (so a late side is not joined)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from llmesh.common.registry import Routing
from llmesh.v1 import eval_pb2

PREFIX = "llmesh:eval"
DEADLINES = f"{PREFIX}:join:deadlines"
MAX_SCORES = 10_000


def join_key(request_id: str) -> str:
    return f"{PREFIX}:join:{request_id}"


def template_key(scenario: str) -> str:
    """The name a scenario's template candidates are scored under (no model name holds a '/')."""
    return f"scenario/{scenario}"


def scores_key(model: str, version: int) -> str:
    return f"{PREFIX}:scores:{model}:{version}"


def missing_key(model: str, version: int) -> str:
    return f"{PREFIX}:missing:{model}:{version}"


def late_key(model: str, version: int) -> str:
    return f"{PREFIX}:late:{model}:{version}"


def expired_key(request_id: str) -> str:
    return f"{PREFIX}:join:expired:{request_id}"


LATE = "late"  # what PairJoin.add returns for a side whose pair was already counted missing


@dataclass(frozen=True)
class Side:
    """One answer: which version gave it, its text, how long generation took, whether it failed;
    for the client's answer to a scenario whose shadow template was mirrored, that template version."""

    model: str
    version: int
    text: str
    generation_ms: float
    error: bool
    scenario: str = ""
    shadow_template_version: int = 0

    def template_candidate(self) -> tuple[str, int] | None:
        """Where the pair is scored when its mirror is a shadow template's answer."""
        return (template_key(self.scenario), self.shadow_template_version) if self.shadow_template_version else None

    def dump(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def load(cls, raw: str) -> Side:
        return cls(**json.loads(raw))


def paired_sides(sides: dict[str, Side], routing: Routing) -> tuple[tuple[str, int], Side, Side] | None:
    """Where a complete pair is scored, the primary's side and the candidate's: a scenario's shadow
    template (one model version, two prompts), else the model's candidate as routed now."""
    answer = sides["answer"]
    if scored := answer.template_candidate():
        return scored, answer, sides["mirror"]
    by_version = {s.version: s for s in sides.values()}
    candidate, primary = by_version.get(routing.candidate), by_version.get(routing.primary)
    if candidate is None or primary is None or candidate is primary:
        return None
    return (answer.model, candidate.version), primary, candidate


class PairJoin:
    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self.redis = client
        self.ttl_s = ttl_s

    async def add(self, request_id: str, role: str, side: Side) -> dict[str, Side] | str | None:
        """Store one side ("answer" or "mirror"); return both sides once the pair is complete, or
        LATE when the request was already counted missing."""
        if await self.redis.exists(expired_key(request_id)):
            return LATE
        key = join_key(request_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, role, side.dump())
            pipe.expire(key, int(self.ttl_s) + 60)
            pipe.zadd(DEADLINES, {request_id: time.time() + self.ttl_s}, nx=True)
            pipe.hgetall(key)
            *_, sides = await pipe.execute()
        if len(sides) < 2:
            return None
        if not await self.redis.zrem(DEADLINES, request_id):
            return None  # another replica completed it first
        await self.redis.delete(key)
        return {r: Side.load(v) for r, v in sides.items()}

    async def sweep(self) -> list[Side]:
        """Requests past their join deadline with one side only: returns the side that came."""
        now = time.time()
        lonely: list[Side] = []
        for due in await self.redis.zrangebyscore(DEADLINES, 0, now):
            request_id = str(due)
            if not await self.redis.zrem(DEADLINES, request_id):
                continue
            sides = await self.redis.hgetall(join_key(request_id))
            await self.redis.delete(join_key(request_id))
            await self.redis.set(expired_key(request_id), "1", ex=600)
            lonely.extend(Side.load(str(v)) for v in sides.values())
        return lonely


class CandidateScores:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    async def add(self, model: str, version: int, score: dict[str, Any]) -> None:
        key = scores_key(model, version)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, json.dumps(score))
            pipe.ltrim(key, -MAX_SCORES, -1)
            await pipe.execute()

    async def count_missing(self, model: str, version: int) -> None:
        await self.redis.incr(missing_key(model, version))

    async def count_late(self, model: str, version: int) -> None:
        await self.redis.incr(late_key(model, version))

    async def stats(self, model: str, version: int, mode: str, window_s: float) -> eval_pb2.CandidateStats:
        since = time.time() - window_s
        rows = [
            r for r in (json.loads(x) for x in await self.redis.lrange(scores_key(model, version), 0, -1)) if r["at"] >= since
        ]
        missing = int(await self.redis.get(missing_key(model, version)) or 0)
        late = int(await self.redis.get(late_key(model, version)) or 0)
        out = eval_pb2.CandidateStats(
            model=model, candidate_version=version, mode=mode, pairs=len(rows), missing=missing, late=late
        )
        if not rows:
            return out
        n = len(rows)

        def mean(name: str) -> float:
            return sum(float(r[name]) for r in rows) / n

        out.candidate_errors = sum(bool(r["candidate_error"]) for r in rows)
        out.error_rate = out.candidate_errors / n
        out.exact_match, out.token_agreement, out.rouge_l = mean("exact_match"), mean("token_agreement"), mean("rouge_l")
        out.embedding_cosine, out.latency_delta_ms = mean("embedding_cosine"), mean("latency_delta_ms")
        out.length_ratio = mean("length_ratio")
        out.sensitive_hits = sum(int(r["sensitive_hits"]) for r in rows)
        return out
