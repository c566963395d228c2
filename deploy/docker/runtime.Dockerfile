# The Python runtime the llmesh service images start FROM: a venv with llmesh and its
# dependencies, installed offline from a wheelhouse prepared on the host (build-images.sh), then
# copied without pip caches or build tools into a slim image with an unprivileged user.
# EXTRAS picks what the venv adds to the core: none (gateway, tokenize), infer, or eval (torch).
FROM python:3.11-slim-bookworm AS build
ARG EXTRAS=
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY llmesh /src/llmesh
COPY services /src/services
COPY bench /src/bench
RUN --mount=type=bind,source=deploy/docker/wheels,target=/wheels \
    /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-index --find-links /wheels "/src${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /home/llmesh --create-home llmesh
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    LLMESH_GRPC_HOST=0.0.0.0 LLMESH_METRICS_HOST=0.0.0.0
WORKDIR /home/llmesh
USER 10001
