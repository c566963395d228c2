"""Feedback on answers, and the recorded prompts and answers it can turn into a fine-tuning set.

Keys:
  llmesh:request:{request_id}        hash (TTL: the feedback window): api_key_id, model, version, scenario
                                     of an answered request, written by the gateway that answered it
  llmesh:eval:feedback               sorted set: request ids by the time of their latest feedback
  llmesh:eval:feedback:data          hash: request id -> JSON FeedbackEvent (the latest wins)
  llmesh:eval:recorded:{request_id}  JSON RecordedText (TTL: LLMESH_RECORD_RETENTION_S), only when the
                                     gateways record texts (LLMESH_RECORD_TEXTS, off by default)
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

FEEDBACK_INDEX = "llmesh:eval:feedback"
FEEDBACK_DATA = "llmesh:eval:feedback:data"


def request_key(request_id: str) -> str:
    return f"llmesh:request:{request_id}"


def recorded_key(request_id: str) -> str:
    return f"llmesh:eval:recorded:{request_id}"


class FeedbackInput(BaseModel):
    """A client's feedback, as it arrives (gRPC or HTTP): validated before anything is looked up."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    rating: int = Field(ge=1, le=5)
    label: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_-]*$")
    comment: str = Field(default="", max_length=2000)


class RequestOwner(BaseModel):
    """Who asked for an answer, and which version gave it."""

    api_key_id: str = ""
    model: str
    version: int
    scenario: str = ""
    template_version: int = 0


class RecordedText(BaseModel):
    prompt: str
    answer: str
