#!/usr/bin/env bash
# Regenerates link/hot-code.txt: the functions of the release binary that
# a running supervisor executes once start-up is over (its event loop,
# spawns and exits, timers, probes, log pumps, status, events, a job run,
# a stop), found with callgrind. build.rs hands the list to the linker,
# which lays these functions out together: drover drops its code pages
# when start-up is over, and what the steady state faults back in (64 KiB
# around each touch) is then about 1 MB instead of most of the binary.
# A stale list only costs resident pages, never correctness; rerun this
# after upgrading dependencies or the toolchain (their symbols change):
#
#   apt-get install valgrind && link/profile-hot-code.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null || {
    echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --locked --manifest-path "$repo/Cargo.toml" >&2
drover="$repo/target/release/drover"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# One profile per containment mode (cgroup mode needs root and cgroup2).
profile() {
    local mode="$1" dir="$work/$1" port="$2"
    mkdir -p "$dir"
    cat > "$dir/daemon.toml" <<TOML
[supervisor]
state_dir = "$dir/state"
containment = "$mode"

[workers.w]
command = ["sleep", "3600"]
capacity = 50
backoff = { initial = "0s", max = "0s", multiplier = 1.0 }

[workers.chatty]
command = ["sh", "-c", "while true; do echo out; echo err >&2; sleep 0.2; done"]

[workers.web]
command = ["python3", "-m", "http.server", "$port", "--bind", "127.0.0.1"]
ready = { http = "http://127.0.0.1:$port/" }
health = { tcp = "127.0.0.1:$port", interval = "1s" }

[workers.flaky]
command = ["sh", "-c", "sleep 1; exit 3"]
backoff = { initial = "200ms", max = "1s" }

[jobs.tick]
command = ["true"]
every = "2s"
TOML
    local d=("$drover" -c "$dir/daemon.toml")
    # valgrind follows no clone but fork's and vfork's, and aborts on
    # drover's own (CLONE_VM | CLONE_FILES, clone3): an open-files limit
    # under 1024 makes drover spawn through std's posix_spawn instead.
    # The functions of its own spawn are added from the symbol table below.
    (ulimit -n 1000; exec valgrind --tool=callgrind --demangle=no --separate-threads=no \
        --callgrind-out-file="$dir/cg.out" "${d[@]}" start) > "$dir/drover.out" 2>&1 &
    local vg=$!
    for _ in $(seq 600); do "${d[@]}" status >/dev/null 2>&1 && break; sleep 0.5; done
    sleep 20  # start-up over: every instance up, the web worker ready
    callgrind_control -z "$vg" >/dev/null
    for _ in 1 2 3 4 5; do "${d[@]}" status >/dev/null; "${d[@]}" status --json >/dev/null; sleep 1; done
    for pid in $("${d[@]}" status --json | python3 -c 'import json, sys
d = json.load(sys.stdin)
print(" ".join(str(i["pid"]) for w in d["workers"] if w["name"] == "w" for i in w["instances"][:10] if i.get("pid")))'); do
        kill -9 "$pid"; sleep 0.3
    done
    "${d[@]}" restart w >/dev/null
    timeout 3 "${d[@]}" events -f >/dev/null 2>&1 || true
    "${d[@]}" logs chatty -n 5 >/dev/null 2>&1 || true
    "${d[@]}" trigger tick >/dev/null
    sleep 10
    for _ in 1 2 3; do "${d[@]}" status --json >/dev/null; done
    "${d[@]}" stop >/dev/null
    wait "$vg" || true
}

profile process-group 18777
if [[ $(id -u) -eq 0 ]]; then profile cgroup 18778; fi

# Every function of drover's own object with a cost after the zeroing,
# in either profile (the zeroing dropped start-up's counts).
nm --defined-only "$drover" | awk '{print $3}' > "$work/symbols"
python3 - "$work" "$repo/link/hot-code.txt" <<'PY'
import glob, re, sys
work, out = sys.argv[1], sys.argv[2]
# drover's own spawn, which the profile could not run (see above), and
# what calls it and makes its cgroups (their fallback ran instead).
modules = ("6drover2os5spawn", "6drover2os6cgroup", "6drover10supervisor5child", "6drover10supervisor11containment")
hot = {s.strip() for s in open(f"{work}/symbols") if any(m in s for m in modules)}
for path in glob.glob(f"{work}/*/cg.out*"):
    names, obs, ob = {}, {}, None
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        m = re.match(r"^(c?ob|c?fn|fl|fi|fe|cfi|cfl)=\((\d+)\)(?: (.*))?$", line)
        if not m:
            continue
        kind, ident, name = m.groups()
        table = obs if kind in ("ob", "cob") else names
        if name:
            table[(kind.lstrip("c") if kind != "cob" else "ob", ident)] = name
        if kind == "ob":
            ob = obs.get(("ob", ident))
        elif kind == "fn" and ob and ob.endswith("/drover"):
            fn = names.get(("fn", ident))
            if fn and fn.startswith("_"):
                hot.add(fn)
open(out, "w").write("".join(f"{f}\n" for f in sorted(hot)))
print(f"{len(hot)} functions written to {out}", file=sys.stderr)
PY
