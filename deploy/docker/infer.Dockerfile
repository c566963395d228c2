# llmesh infer with tritonserver inside the same container: infer runs it (LLMESH_TRITON_COMMAND),
# restarts it if it dies and reloads what it serves. tritonserver 2.51 and its python backend come
# from the nvidia-pytriton wheel in the runtime (CPU here; on GPU nodes with the NVIDIA runtime).
ARG TAG=0.1.0
FROM llmesh/runtime-infer:${TAG}
USER root
RUN BACKENDS=/opt/triton/backends/python \
 && SITE=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
 && mkdir -p $BACKENDS /triton-models /model-store \
 && ln -s $SITE/pytriton/tritonserver/backends/python/libtriton_python.so $BACKENDS/ \
 && ln -s $SITE/pytriton/tritonserver/backends/python/triton_python_backend_utils.py $BACKENDS/ \
 && ln -s $SITE/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub $BACKENDS/ \
 && ln -s $SITE/pytriton/tritonserver/bin/tritonserver /opt/venv/bin/tritonserver \
 && chown 10001 /triton-models /model-store
USER 10001
ENV LLMESH_GRPC_PORT=50053 LLMESH_METRICS_PORT=9103 \
    LLMESH_TRITON_URL=127.0.0.1:8001 LLMESH_MODEL_REPOSITORY=/triton-models LLMESH_MODEL_STORE=/model-store \
    LD_LIBRARY_PATH=/usr/local/lib:/usr/lib/x86_64-linux-gnu \
    LLMESH_TRITON_COMMAND='["tritonserver", "--model-repository=/triton-models", "--model-control-mode=explicit", "--backend-directory=/opt/triton/backends", "--disable-auto-complete-config", "--pinned-memory-pool-byte-size=0", "--exit-timeout-secs=10", "--grpc-address=127.0.0.1", "--grpc-port=8001", "--http-address=127.0.0.1", "--http-port=8000", "--metrics-address=0.0.0.0", "--metrics-port=8002", "--log-verbose=0"]'
EXPOSE 50053 9103 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 CMD ["llmesh", "health", "127.0.0.1:50053"]
STOPSIGNAL SIGTERM
CMD ["llmesh", "serve", "infer"]
