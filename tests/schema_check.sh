#!/usr/bin/env bash
# The published schema (schema/daemon.schema.json) against the config
# corpus, with check-jsonschema, as an editor or a pre-commit hook uses it:
# every valid file passes; every invalid file fails, except those whose
# only errors are rules JSON Schema cannot say (listed below), which pass.
# Installs check-jsonschema when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Invalid corpus files with no error the schema can express: directories
# that must exist, cron values out of range, the backoff order, unique step
# names, time zones, secret_env naming a set key, durations past their
# upper bound (a string pattern cannot compare lengths of time) and sizes
# below their lower bound (max_memory), what a
# depends_on name refers to (unknown, itself, a cycle, a condition that does
# not fit its kind), and what probe strings mean (URL scheme, HOST:PORT,
# ${NAME} placeholders, a regex that compiles, a zero timeout), and what
# a socket address holds (an IP, not a host name; a mode only on a unix
# socket; one address per worker; the metrics port, 0 refused).
SCHEMA_PASSES=(
  env-file-missing-or-malformed
  identity-unknown-user
  backoff-initial-over-max
  bad-cron
  depends-on-condition-misfit
  depends-on-condition-mismatch
  depends-on-cycle
  depends-on-self
  depends-on-unknown
  cron-hour-out-of-range
  duplicate-step-names
  duration-backoff-initial-years
  duration-every-years
  duration-jitter-years
  max-memory-too-small
  metrics-port-zero
  missing-dir
  probe-bad-placeholder
  probe-bad-regex
  probe-bounds
  probe-https
  probe-tcp-no-port
  secret-env-defaults-unset
  sockets-host-name
  sockets-shared
  sockets-tcp-mode
  secret-env-typo
  timezone-typo
  unknown-timezone
)

if ! command -v check-jsonschema >/dev/null 2>&1; then
  . tests/python_venv.sh
  python_venv check-jsonschema
fi

schema=schema/daemon.schema.json
check-jsonschema --schemafile "$schema" tests/corpus/valid/*.toml config/*.toml

failed=0
for file in tests/corpus/invalid/*.toml; do
  name=$(basename "$file" .toml)
  expect=fail
  for p in "${SCHEMA_PASSES[@]}"; do
    [ "$p" = "$name" ] && expect=pass
  done
  if check-jsonschema --schemafile "$schema" "$file" >/dev/null 2>&1; then got=pass; else got=fail; fi
  if [ "$got" != "$expect" ]; then
    echo "schema check: $file should $expect the schema but did $got" >&2
    failed=1
  fi
done
[ "$failed" = 0 ] && echo "schema check: the corpus agrees with $schema"
exit "$failed"
