#!/usr/bin/env bash
# promtool (Prometheus 2.42, from Debian's `prometheus` package) to check and unit-test the alert rules
# in deploy/prometheus. Installs the package when promtool is missing (root and apt needed), then links
# it beside the interpreter. Usage: install-promtool.sh BIN_DIR
set -euo pipefail
target=${1:?usage: install-promtool.sh BIN_DIR}
if ! command -v promtool >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
fi
ln -sf "$(command -v promtool)" "$target/promtool"
"$target/promtool" --version | head -1
