#!/usr/bin/env bash
# `[supervisor] metrics` read by the real Prometheus client library's
# parsers: starts drover (debug build) on config/metrics.toml, with its
# state_dir in a temporary directory and a free port (--set), runs its job, scrapes /metrics over TCP in both
# formats, parses the Prometheus text with
# prometheus_client.parser.text_string_to_metric_families and the
# OpenMetrics text with prometheus_client.openmetrics.parser, and checks
# that every family is there with its type and labels. Installs
# prometheus-client in a cached venv when it is missing; stops every
# process it started, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

. tests/python_venv.sh
python_venv prometheus-client

cargo build --locked --quiet
drover="$PWD/target/debug/drover"

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
d() { "$drover" -c config/metrics.toml --set "supervisor.state_dir=$dir" --set "supervisor.metrics=127.0.0.1:$port" "$@"; }
cleanup() {
  if ! d stop >/dev/null 2>&1; then
    # A supervisor that does not answer: SIGKILL it (the pid in its lock,
    # if that is still drover), then the process groups of its instances
    # (its state file lists what it ran).
    pid=$(cat "$dir/drover.lock" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$drover" ]; then
      kill -KILL "$pid" 2>/dev/null || true
      python3 -c 'import json, sys
for w in json.load(open(sys.argv[1])).get("workers", []):
    for i in w.get("instances", []):
        if i.get("pgid"): print(i["pgid"])' "$dir/state.json" 2>/dev/null |
        while read -r pgid; do kill -KILL -- "-$pgid" 2>/dev/null || true; done
    fi
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

d start --detach >/dev/null
d trigger tick >/dev/null

python3 - "$port" <<'PY'
import sys, time, urllib.request
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

url = f"http://127.0.0.1:{sys.argv[1]}/metrics"

def scrape(accept=None):
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers.get("Content-Type"), r.read().decode()

def families(parse, text):
    return {f.name: f for f in parse(text)}

expected = {
    "drover_instance_up": ("gauge", {"worker", "instance"}),
    "drover_instance_ready": ("gauge", {"worker", "instance"}),
    "drover_instance_restarts": ("counter", {"worker", "instance"}),
    "drover_instance_cpu_seconds": ("counter", {"worker", "instance"}),
    "drover_instance_memory_bytes": ("gauge", {"worker", "instance"}),
    "drover_job_runs": ("counter", {"job", "state"}),
    "drover_job_skips": ("counter", {"job"}),
    "drover_reloads": ("counter", {"result"}),
    "drover_config_generation": ("gauge", set()),
}

# Until the triggered run has ended and both instances are up.
deadline = time.monotonic() + 15
while True:
    kind, text = scrape()
    fams = families(text_string_to_metric_families, text)
    runs = {tuple(sorted(s.labels.items())): s.value for s in fams["drover_job_runs"].samples}
    ups = [s.value for s in fams["drover_instance_up"].samples if s.labels["worker"] == "web"]
    if runs.get((("job", "tick"), ("state", "succeeded"))) == 1 and ups == [1, 1]:
        break
    if time.monotonic() > deadline:
        sys.exit(f"metrics check: the run or the instances never showed:\n{text}")
    time.sleep(0.1)

problems = []
assert kind.startswith("text/plain; version=0.0.4"), kind
om_kind, om_text = scrape("application/openmetrics-text; version=1.0.0")
assert om_kind.startswith("application/openmetrics-text"), om_kind
for fmt, found in [("prometheus", fams), ("openmetrics", families(openmetrics_families, om_text))]:
    for name, (typ, labels) in expected.items():
        f = found.get(name)
        if f is None:
            problems.append(f"{fmt}: no family {name}")
            continue
        if f.type != typ:
            problems.append(f"{fmt}: {name} is a {f.type}, not a {typ}")
        if not f.samples:
            problems.append(f"{fmt}: {name} has no sample")
        for s in f.samples:
            if set(s.labels) != labels:
                problems.append(f"{fmt}: {s.name} has labels {sorted(s.labels)}, not {sorted(labels)}")
    if set(found) - set(expected):
        problems.append(f"{fmt}: unexpected families {sorted(set(found) - set(expected))}")
gen = fams["drover_config_generation"].samples[0].value
if gen != 1:
    problems.append(f"generation is {gen}, not 1")
if problems:
    sys.exit("metrics check:\n  " + "\n  ".join(problems) + "\n" + text)
print(f"metrics check: {len(expected)} families parsed by prometheus_client in both formats")
PY
