# llmesh gateway: the public gRPC API and the OpenAI-compatible HTTP API (8080).
ARG TAG=0.1.0
FROM llmesh/runtime:${TAG}
ENV LLMESH_GRPC_PORT=50051 LLMESH_HTTP_PORT=8080 LLMESH_METRICS_PORT=9101 LLMESH_HTTP_HOST=0.0.0.0
EXPOSE 50051 8080 9101
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 CMD ["llmesh", "health", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
CMD ["llmesh", "serve", "gateway"]
