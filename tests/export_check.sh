#!/usr/bin/env bash
# `drover export kubernetes` over every example config and the valid
# corpus, checked by kubernetes-validate --strict against the oldest
# Kubernetes the output targets (1.27: CronJob timeZone is GA there) and
# the newest it ships. Installs kubernetes-validate when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Valid configs that must not export, and the key the error names: an
# interval cron cannot express.
declare -A EXPORT_FAILS=(
  [tests/corpus/valid/jobs.toml]="jobs.sync.every"
)
VERSIONS=(1.27.0 1.37.0)

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  venv="${XDG_CACHE_HOME:-$HOME/.cache}/drover-ci/venv"
  if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    if [ ! -x "$venv/bin/pip" ] && ! python3 -m venv "$venv" 2>/dev/null; then
      command -v apt-get >/dev/null && { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
      rm -rf "$venv"
      python3 -m venv "$venv"
    fi
    "$venv/bin/pip" install --quiet kubernetes-validate
  fi
  PATH="$venv/bin:$PATH"
fi

cargo build --quiet --locked
drover=target/debug/drover
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

failed=0
for file in config/*.toml tests/corpus/valid/*.toml; do
  name=$(basename "$file" .toml)
  dest="$out/$(dirname "$file" | tr / _)-$name.yaml"
  if "$drover" -c "$file" export kubernetes --allow-lossy --workdir /app --emit-secrets -o "$dest" 2>"$out/err"; then
    if [ -n "${EXPORT_FAILS[$file]:-}" ]; then
      echo "export check: $file exported, but should fail naming ${EXPORT_FAILS[$file]}" >&2
      failed=1
    fi
  elif [ -n "${EXPORT_FAILS[$file]:-}" ] && grep -q "cannot export ${EXPORT_FAILS[$file]}:" "$out/err"; then
    :
  else
    echo "export check: $file did not export:" >&2
    cat "$out/err" >&2
    failed=1
  fi
done
for v in "${VERSIONS[@]}"; do
  if ! kubernetes-validate --strict --quiet -k "$v" "$out"/*.yaml; then
    echo "export check: kubernetes-validate --strict -k $v failed" >&2
    failed=1
  fi
done
[ "$failed" = 0 ] && echo "export check: $(ls "$out"/*.yaml | wc -l) exports pass kubernetes-validate --strict for ${VERSIONS[*]}"
exit "$failed"
