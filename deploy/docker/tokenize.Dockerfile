# llmesh tokenize: tokenizer RPCs and the Kafka entry for text.
ARG TAG=0.1.0
FROM llmesh/runtime:${TAG}
ENV LLMESH_GRPC_PORT=50052 LLMESH_METRICS_PORT=9102
EXPOSE 50052 9102
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 CMD ["llmesh", "health", "127.0.0.1:50052"]
STOPSIGNAL SIGTERM
CMD ["llmesh", "serve", "tokenize"]
