"""The eval service: consumes a record of every finished generation and keeps per-version aggregates."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import grpc
from faststream.kafka import KafkaMessage
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from llmesh.common import kafka, topics
from llmesh.common.serving import KafkaService, run_service
from llmesh.common.settings import load_settings
from llmesh.v1 import eval_pb2, eval_pb2_grpc, events_pb2
from services.eval.settings import EvalSettings
from services.eval.stats import GenerationStats

RECORDS = Counter("llmesh_eval_records_total", "Generation records consumed", ["model", "version"])


class EvalService(KafkaService, eval_pb2_grpc.EvalServicer):
    name = "eval"

    def __init__(self, settings: EvalSettings) -> None:
        super().__init__(settings)
        self.stats = GenerationStats()
        kafka.subscribe(
            self.broker, topics.GENERATE_RESULTS, kafka.consumer_options(settings.kafka, topics.GROUP_EVAL), self.on_record
        )

    def register(self, server: grpc.aio.Server) -> list[str]:
        eval_pb2_grpc.add_EvalServicer_to_server(self, server)
        return [eval_pb2.DESCRIPTOR.services_by_name["Eval"].full_name]

    async def on_record(self, msg: KafkaMessage) -> None:
        try:
            record = events_pb2.GenerationRecord.FromString(msg.body)
        except DecodeError as err:
            await self.dead_letters.send(msg, f"undecodable GenerationRecord: {err}")
            return
        self.stats.add(record)
        RECORDS.labels(record.model, str(record.version)).inc()

    async def GetReport(self, request: eval_pb2.GetReportRequest, context: grpc.aio.ServicerContext) -> eval_pb2.EvalReport:
        return self.stats.report(request.model)


def main(argv: Sequence[str] | None = None) -> int:
    settings = load_settings(EvalSettings, argv, "eval")
    return asyncio.run(run_service(EvalService(settings), settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
