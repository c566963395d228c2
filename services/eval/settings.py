from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator

from llmesh.common.settings import ServiceSettings


class EvalSettings(ServiceSettings):
    grpc_port: int = 50054
    metrics_port: int = 9104
    policy_file: Path | None = Field(default=None, description="YAML promotion policy (defaults if unset)")
    policy_interval_s: float = Field(default=1.0, gt=0)
    join_ttl_s: float = Field(default=30.0, gt=0, description="how long one side of a pair waits for the other")
    preload_embedder: bool = Field(
        default=False,
        description="load the embedding model at start (about 360 MB more at idle) instead of on the first scored pair",
    )
    sensitive_words: list[str] = Field(default_factory=lambda: ["password", "secret", "token", "ssn"])
    webhook_urls: list[str] = Field(
        default_factory=list,
        description="HTTP(S) URLs that get refusals, pending and expired approvals, rollbacks and policy decisions (JSON list)",
    )
    webhook_secret: SecretStr | None = Field(default=None, description="signs every webhook delivery (HMAC-SHA256)")
    webhook_attempts: int = Field(default=5, ge=1, le=20, description="tries per delivery before it is dead-lettered")
    record_retention_s: float = Field(
        default=30 * 24 * 3600, gt=0, description="how long recorded prompts, answers and feedback are kept for the export"
    )

    @model_validator(mode="after")
    def _webhooks_are_signed(self) -> EvalSettings:
        if self.webhook_urls and self.webhook_secret is None:
            raise ValueError("LLMESH_WEBHOOK_SECRET is required with LLMESH_WEBHOOK_URLS: deliveries are signed")
        if bad := [u for u in self.webhook_urls if not u.startswith(("http://", "https://"))]:
            raise ValueError(f"webhook URLs must be http:// or https://, got {bad[0][:200]!r}")
        return self
