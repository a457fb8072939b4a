#!/usr/bin/env bash
# Checks deploy/ (CI runs it from .ci/run): the alert rules parse and their unit tests pass
# (promtool, from Debian's `prometheus` package), the dashboard and manifests parse, every
# metric they name is one the daemon exports (src/telemetry/metrics.rs), and the systemd unit
# verifies.
set -euo pipefail
cd "$(dirname "$0")/.."
metrics_source=${METRICS_SOURCE:-src/telemetry/metrics.rs}

if ! command -v promtool >/dev/null; then
  echo "== installing promtool (Debian package prometheus)"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if ! python3 -c 'import yaml' 2>/dev/null; then
  python3 -m pip install --quiet pyyaml
fi

echo "== alert rules"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml

echo "== dashboard, manifests and metric names"
python3 - "$metrics_source" <<'PY'
import json, pathlib, re, sys, yaml

source = pathlib.Path(sys.argv[1])
if not source.exists():
    sys.exit(f"{source} not found: the daemon's metric names are read from it")
exported = set(re.findall(r'"(updog_backup_[a-z0-9_]+)"', source.read_text()))
if not exported:
    sys.exit(f"no metric names in {source}")

def used(text):
    names = set()
    for name in re.findall(r"updog_backup_[a-z0-9_]+", text):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in exported:
                name = name[: -len(suffix)]
        names.add(name)
    return names

dashboard_path = pathlib.Path("deploy/grafana/updog-backup.json")
dashboard = json.loads(dashboard_path.read_text())
exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
assert exprs, "the dashboard has no queries"
files = {str(dashboard_path): "\n".join(exprs)}
for path in ["deploy/prometheus/alerts.yml", "deploy/prometheus/alerts.test.yml"]:
    files[path] = pathlib.Path(path).read_text()
    yaml.safe_load(files[path])
manifests = sorted(pathlib.Path("deploy/kubernetes").glob("*.yaml"))
for path in manifests:
    for doc in yaml.safe_load_all(path.read_text()):
        assert doc and "kind" in doc, f"{path}: not a Kubernetes object"
kustomization = yaml.safe_load(pathlib.Path("deploy/kubernetes/kustomization.yaml").read_text())
for resource in kustomization["resources"]:
    assert pathlib.Path("deploy/kubernetes", resource).exists(), f"kustomization lists missing {resource}"

unknown = {f: sorted(used(t) - exported) for f, t in files.items() if used(t) - exported}
if unknown:
    sys.exit(f"metric names the daemon does not export: {unknown}")
print(f"{len(exprs)} dashboard queries, {len(manifests)} manifests, "
      f"{len(set().union(*map(used, files.values())))} of {len(exported)} metrics referenced: ok")
PY

echo "== systemd unit"
if command -v systemd-analyze >/dev/null; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  # The binary is not installed here: verify the unit with a stand-in command.
  sed 's#^ExecStart=/usr/local/bin/updog-backup#ExecStart=/bin/true#' \
    deploy/systemd/updog-backup.service > "$tmp/updog-backup.service"
  SYSTEMD_LOG_LEVEL=warning systemd-analyze verify "$tmp/updog-backup.service"
  echo "deploy/systemd/updog-backup.service: ok"
else
  echo "systemd-analyze not installed: unit not verified"
fi
