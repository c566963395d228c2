#!/usr/bin/env bash
# Makes a Docker engine answer for the container tests (tests/container): uses the running one, or
# starts dockerd when it is installed and we are root (machines without systemd), or, in CI only,
# installs Debian's docker.io (and debootstrap, which build-images.sh needs when no registry answers)
# first. Exits 0 with a notice when no engine can be had: the container tests then skip (fail in CI).
set -uo pipefail
log=${DOCKERD_LOG:-/tmp/llmesh-dockerd.log}

answers() { docker_cli=$(command -v /usr/bin/docker || command -v docker) && "$docker_cli" info >/dev/null 2>&1; }

answers && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "docker-engine: no Docker engine answers and we are not root: the container tests will skip"
  exit 0
fi
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  if [ "${CI:-}" != true ]; then
    echo "docker-engine: dockerd is not installed (apt-get install docker.io debootstrap): the container tests will skip"
    exit 0
  fi
  echo "docker-engine: installing docker.io and debootstrap"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq docker.io debootstrap; } >"$log" 2>&1 || {
    echo "docker-engine: apt-get could not install docker.io"; tail -5 "$log"; exit 0; }
fi
echo "docker-engine: starting dockerd (log: $log)"
nohup dockerd >"$log" 2>&1 &
for _ in $(seq 60); do
  answers && exit 0
  sleep 0.5
done
echo "docker-engine: dockerd did not answer within 30 s; see $log"
tail -5 "$log"
exit 0
