#!/usr/bin/env bash
# Builds every llmesh image locally: the runtimes (llmesh/runtime, and llmesh/runtime-infer and
# llmesh/runtime-eval with torch), then llmesh/{gateway,tokenize,infer,eval} on top of them.
# With no image registry reachable, it first builds the base the Dockerfiles name
# (python:3.11-slim-bookworm) from Debian's packages, so the Dockerfiles stay standard.
# Python packages are downloaded on the host into a wheelhouse and installed offline in the build.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${TAG:-0.1.0}
# Debian's docker client (with BuildKit) where present; a newer client without buildx cannot build
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
here=deploy/docker
export DOCKER_BUILDKIT=1

has_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

if ! has_image python:3.11-slim-bookworm && ! "$DOCKER" pull -q python:3.11-slim-bookworm 2>/dev/null; then
  if ! has_image local/debian:bookworm; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | grep -oE 'https?://[^ ]+/debian/?$' | head -1 || true)
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$rootfs" "${mirror:-http://deb.debian.org/debian}" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$DOCKER" import -c 'CMD ["/bin/bash"]' - local/debian:bookworm >/dev/null
    rm -rf "$rootfs"
  fi
  "$DOCKER" build -q --network=host -t python:3.11-slim-bookworm -f $here/base/python.Dockerfile $here/base
fi

# every service's extras; not `stack` (the embedded broker and Redis): no image runs them
python3 -m pip download -q --disable-pip-version-check -d $here/wheels '.[infer,eval]' setuptools wheel 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
"$DOCKER" build -q --network=none -t llmesh/runtime:$TAG -f $here/runtime.Dockerfile .
for extra in infer eval; do
  "$DOCKER" build -q --network=none --build-arg EXTRAS=$extra -t llmesh/runtime-$extra:$TAG -f $here/runtime.Dockerfile .
done
for service in gateway tokenize infer eval; do
  "$DOCKER" build -q --network=none --build-arg TAG=$TAG -t llmesh/$service:$TAG -f $here/$service.Dockerfile $here
done
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' 'llmesh/*'
