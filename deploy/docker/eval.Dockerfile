# llmesh eval: shadow scoring and the promotion policy.
ARG TAG=0.1.0
FROM llmesh/runtime-eval:${TAG}
ENV LLMESH_GRPC_PORT=50054 LLMESH_METRICS_PORT=9104
EXPOSE 50054 9104
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 CMD ["llmesh", "health", "127.0.0.1:50054"]
STOPSIGNAL SIGTERM
CMD ["llmesh", "serve", "eval"]
