#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 600), one after another.
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
# A crash, a hang over 10 s or an allocation over 256 MB stops the run with
# the input saved under fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
for target in config_file config_overrides control notify_datagram env_file export dependencies probe_expand; do
  echo "== $target: ${secs}s"
  cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 \
    -max_len=65536 -print_final_stats=1
done
