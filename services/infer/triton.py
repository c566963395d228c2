"""A thin async wrapper over Triton's gRPC client: load, unload, and stream generated tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from llmesh.v1 import events_pb2


class GenerationError(RuntimeError):
    """Triton refused or failed the request."""


@dataclass
class Step:
    token_ids: list[int]
    finish_reason: str = ""  # set on the last step


def _inputs(prompt_ids: list[int], sampling: events_pb2.ResolvedSampling, stream: bool, background: bool) -> list[InferInput]:
    values: list[tuple[str, str, np.ndarray]] = [
        ("INPUT_IDS", "INT32", np.asarray(prompt_ids, dtype=np.int32)),
        ("MAX_TOKENS", "INT32", np.array([sampling.max_tokens], dtype=np.int32)),
        ("TEMPERATURE", "FP32", np.array([sampling.temperature], dtype=np.float32)),
        ("TOP_P", "FP32", np.array([sampling.top_p], dtype=np.float32)),
        ("SEED", "UINT64", np.array([sampling.seed], dtype=np.uint64)),
        ("STREAM", "BOOL", np.array([stream], dtype=np.bool_)),
        ("BACKGROUND", "BOOL", np.array([background], dtype=np.bool_)),
    ]
    if sampling.stop:
        values.append(("STOP", "BYTES", np.array([s.encode() for s in sampling.stop], dtype=np.object_)))
    inputs = []
    for name, dtype, array in values:
        tensor = InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class TritonGenerator:
    def __init__(self, url: str) -> None:
        self.url = url
        self._client: triton.InferenceServerClient | None = None

    @property
    def client(self) -> triton.InferenceServerClient:
        # Created on first use: a grpc.aio channel belongs to the event loop that made it.
        if self._client is None:
            self._client = triton.InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def is_live(self) -> bool:
        try:
            return bool(await self.client.is_server_live(client_timeout=1.0))
        except InferenceServerException:
            return False

    async def is_ready(self, name: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(name))
        except InferenceServerException:
            return False

    async def load(self, name: str) -> None:
        await self.client.load_model(name)

    async def unload(self, name: str) -> None:
        await self.client.unload_model(name)

    async def generate(
        self,
        name: str,
        request_id: str,
        prompt_ids: list[int],
        sampling: events_pb2.ResolvedSampling,
        timeout: float,
        stream: bool = True,
        background: bool = False,
    ) -> AsyncIterator[Step]:
        """Yield one Step per generated token (or, not streaming, one with them all); the last Step
        has a finish reason. A background request yields the CPU to the others (a mirrored request)."""
        request = {
            "model_name": name,
            "inputs": _inputs(prompt_ids, sampling, stream, background),
            "request_id": request_id,
            "enable_empty_final_response": True,
        }

        async def one_request() -> AsyncIterator[dict[str, object]]:
            yield request

        responses = self.client.stream_infer(one_request(), stream_timeout=timeout)
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    raise GenerationError(str(error))
                ids = result.as_numpy("TOKEN_IDS")
                reason = result.as_numpy("FINISH_REASON")
                finish = reason.reshape(-1)[0].decode() if reason is not None and reason.size else ""
                final = result.get_response().parameters.get("triton_final_response")
                finished = bool(finish or (final is not None and final.bool_param))
                yield Step([int(i) for i in ids.reshape(-1)] if ids is not None else [], finish)
                if finished:
                    return
        except grpc.RpcError as err:
            if isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"no final response from Triton within {timeout:.1f}s") from err
            raise GenerationError(f"Triton stream failed: {err}") from err
        finally:
            if not finished:  # stop Triton's generation when we stop early
                responses.cancel()
