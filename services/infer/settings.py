from __future__ import annotations

from pathlib import Path

from pydantic import Field

from llmesh.common.settings import ServiceSettings


class InferSettings(ServiceSettings):
    grpc_port: int = 50053
    metrics_port: int = 9103
    triton_url: str = "127.0.0.1:18001"
    triton_command: list[str] = Field(
        default_factory=list,
        description="tritonserver command line (JSON list): infer runs it, starts it again if it dies and reloads what "
        "it serves; empty: Triton runs beside infer (a sidecar) and infer only reloads after it comes back",
    )
    triton_env: dict[str, str] = Field(default_factory=dict, description="extra environment of triton_command")
    model_repository: Path = Path(".llmesh/triton-models")
    instance_kind: str = Field(default="auto", pattern="^(auto|KIND_CPU|KIND_GPU)$")
    instances: int = Field(default=1, ge=1)
    torch_threads: int = Field(
        default=1,
        ge=0,
        description="CPU threads per model instance; 1 avoids OpenMP oversubscription when versions share cores (0: torch decides)",
    )
    max_batch: int = Field(
        default=32,
        ge=0,
        description="sequences a model instance steps together in one forward pass (continuous batching); beyond, "
        "requests queue in the model; 0: one thread per request, each its own batch of one",
    )
    prefill_tokens: int = Field(
        default=256,
        ge=1,
        description="prompt tokens a model instance prefills between two decode steps: a longer prompt is prefilled in "
        "pieces, so that it does not stall the streams running",
    )
    artifact_roots: list[Path] = Field(
        default_factory=list, description="the model store: release artifacts must lie inside one of these (empty: anywhere)"
    )
    model_store: Path = Field(
        default=Path(".llmesh/model-store"),
        description="verified artifacts by content digest; every infer replica loads from here (shared by the replicas)",
    )
    policy_file: Path | None = Field(
        default=None,
        description="YAML policy (eval's promotion policy file): its `approval` and `require_provenance` gate releases",
    )
    load_timeout_s: float = 120.0
    load_concurrency: int = Field(default=2, ge=1, description="versions a replica loads in Triton at once")
    reconcile_interval_s: float = Field(
        default=0.25, gt=0, description="how often a replica compares itself to the desired state"
    )
    ready_timeout_s: float = Field(
        default=180.0,
        gt=0,
        description="routing moves without a live replica that is not ready with the new version this long after the event",
    )
    warmup_tokens: int = 2
    tokenizer_wait_s: float = Field(
        default=10.0, ge=0, description="wait this long for a gateway or tokenize replica to load a new version's tokenizer"
    )
    keep_previous_s: float = Field(
        default=300.0, ge=0, description="the previous version stays loaded this long for instant rollback"
    )
    stream_interval_ms: float = Field(
        default=16.0,
        ge=0,
        description="streaming: after publishing a chunk, wait this long before the next; tokens made meanwhile leave "
        "together (16 ms: one frame at 60 Hz; a model slower than that still streams token by token)",
    )
    shadow_concurrency: int = Field(default=1, ge=1, description="mirrored requests generated at once")
    shadow_backlog: int = Field(default=8, ge=0, description="mirrored requests waiting beyond this are dropped")
    mirror_niceness: int = Field(
        default=15, ge=0, le=19, description="CPU niceness of the Triton thread generating a mirrored request"
    )
    retire_grace_s: float = Field(
        default=5.0, ge=0, description="an unrouted version waits this long for requests still in transit"
    )
