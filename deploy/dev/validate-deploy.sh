#!/usr/bin/env bash
# Validates deploy/ offline: every Kubernetes manifest against the Kubernetes schemas bundled by
# the `kubernetes-validate` PyPI package, strictly (unknown fields fail); the Prometheus
# operator's PodMonitor/ServiceMonitor have no bundled schema, so tests/it/deploy.rs checks
# their fields against the workloads instead. Then yamllint, and the Grafana dashboard parses.
# The tools go into a virtualenv under target/ (installed from PyPI on first use).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv="${CACHESYNC_TOOLS_VENV:-target/deploy-tools}"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/yamllint" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "kubernetes-validate==1.34.1" "yamllint==1.38.0"
fi
mapfile -t manifests < <(find deploy/k8s -name '*.yaml' | sort)
native=()
for m in "${manifests[@]}"; do
    grep -q 'apiVersion: monitoring.coreos.com/' "$m" || native+=("$m")
done
# 1.33: native sidecars (init containers with restartPolicy: Always) are stable there.
"$venv/bin/kubernetes-validate" --strict --quiet -k 1.33.0 "${native[@]}"
"$venv/bin/yamllint" --strict -c deploy/k8s/.yamllint deploy/k8s
python3 -m json.tool deploy/grafana/cachesync.json >/dev/null
echo "deploy/: ${#manifests[@]} manifests (${#native[@]} validated against the Kubernetes 1.33 schemas), YAML lint and the dashboard are fine"
