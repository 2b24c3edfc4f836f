#!/usr/bin/env bash
# `drover export kubernetes` over every example config and the valid
# corpus, checked by kubernetes-validate --strict against the oldest
# Kubernetes the output targets (1.27: CronJob timeZone is GA there) and
# the newest it ships. Installs kubernetes-validate when it is missing.
# Then `drover export systemd` of the same files, checked by
# `systemd-analyze verify` (systemd's own loader): any line it prints fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# Valid configs that must not export, and the key the error names: an
# interval cron cannot express.
declare -A EXPORT_FAILS=(
  [tests/corpus/valid/jobs.toml]="jobs.sync.every"
)
VERSIONS=(1.27.0 1.37.0)
# The same for the systemd export (none: every valid config exports).
declare -A EXPORT_FAILS_SYSTEMD=()

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  . tests/python_venv.sh
  python_venv kubernetes-validate
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

# systemd: every file's units in one scratch root, under its own prefix.
# verify loads the units as systemd would (the root's own units, such as
# multi-user.target, are this machine's) and checks that each ExecStart=
# program exists: the programs of the target machine are not this one's,
# so each first word of an ExecStart= line gets a stub executable in the
# root, at its absolute path or, for a bare name, in /usr/bin (systemd's
# search path). Everything else verify says is a real finding.
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "export check: systemd-analyze is not installed (apt-get install systemd)" >&2
  exit 1
fi
root="$out/systemd-root"
units="$root/etc/systemd/system"
mkdir -p "$units" "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
checked=0
for file in config/*.toml tests/corpus/valid/*.toml; do
  [ -n "${EXPORT_FAILS_SYSTEMD[$file]:-}" ] && continue
  prefix="$(basename "$(dirname "$file")")-$(basename "$file" .toml)"
  if ! "$drover" -c "$file" export systemd --allow-lossy --prefix "$prefix" --workdir /srv/app -o "$units" 2>"$out/err"; then
    echo "export check: $file did not export to systemd:" >&2
    cat "$out/err" >&2
    failed=1
    continue
  fi
  (
    cd "$units"
    sed -n 's/^ExecStart=//p' "$prefix"-*.service 2>/dev/null | while read -r first _; do
      first=${first#\"}; first=${first%\"}
      case "$first" in /*) stub="$root$first" ;; *) stub="$root/usr/bin/$first" ;; esac
      [ -e "$stub" ] && continue
      mkdir -p "$(dirname "$stub")" && printf '#!/bin/sh\n' >"$stub" && chmod +x "$stub"
    done
    # A template is verified through its first instance.
    list=("$prefix.target")
    for u in "$prefix"-*.service "$prefix"-*.timer "$prefix"-*.target; do
      [ -e "$u" ] || continue
      case "$u" in *@.service) list+=("${u%@.service}@0.service") ;; *) list+=("$u") ;; esac
    done
    said=$(systemd-analyze verify --root="$root" --man=no "${list[@]}" 2>&1)
    rc=$?
    printf '%s\n' "$said"
    [ "$rc" = 0 ] && [ -z "$said" ]
  ) >"$out/verify" 2>&1 || {
    echo "export check: systemd-analyze verify of $file ($prefix.target):" >&2
    cat "$out/verify" >&2
    failed=1
  }
  checked=$((checked + 1))
done
# The check itself must be able to fail: verify in this root reports a
# unit with a missing program and an assignment systemd ignores.
printf '[Service]\nExecStart=/nonexistent/prog\nEnvironment=BAD.NAME=x\n' >"$units/export-check-canary.service"
said=$(cd "$units" && systemd-analyze verify --root="$root" --man=no export-check-canary.service 2>&1 || true)
if ! grep -q 'nonexistent/prog' <<<"$said" || ! grep -q 'BAD.NAME' <<<"$said"; then
  echo "export check: systemd-analyze verify in the scratch root did not report a broken unit: $said" >&2
  failed=1
fi
[ "$failed" = 0 ] && echo "export check: $checked systemd exports pass systemd-analyze verify ($(systemd-analyze --version | head -n 1))"
exit "$failed"
