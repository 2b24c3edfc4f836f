#!/usr/bin/env bash
# Regenerates link/hot-code.txt: the functions of the release binary that
# a running supervisor executes once start-up is over (its event loop,
# spawns and exits, timers, probes, log pumps, status, events, a job run,
# a stop), found with callgrind; then those of the common commands
# (status, runs, logs), and the named read-only data (tables, statics)
# that all of that code refers to. build.rs hands the list to the linker,
# which lays each group out together: drover drops its code pages when
# start-up is over, and what the steady state faults back in (64 KiB
# around each touch) is then a few stretches instead of most of the
# binary; a command's start faults in less for the same reason.
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
    # A scheduled run may be active: then this one is skipped, and fine.
    "${d[@]}" trigger tick >/dev/null 2>&1 || true
    sleep 10
    for _ in 1 2 3; do "${d[@]}" status --json >/dev/null; done
    "${d[@]}" stop >/dev/null
    wait "$vg" || true
}

profile process-group 18777
if [[ $(id -u) -eq 0 ]]; then profile cgroup 18778; fi

# The commands people and scripts run often, each a process of its own
# from exec to exit: their functions go after the supervisor's, together,
# so that a `status` faults in a few stretches of code, not pages from
# all over the binary.
client="$work/client"
mkdir -p "$client"
cat > "$client/daemon.toml" <<TOML
[supervisor]
state_dir = "$client/state"

[workers.w]
command = ["sleep", "3600"]
capacity = 10

[jobs.tick]
command = ["true"]
every = "1h"
TOML
c=("$drover" -c "$client/daemon.toml")
"${c[@]}" start --detach >/dev/null
k=0
for args in "status --json" "status" "status w" "runs --json" "logs w -n 5" "--version"; do
    k=$((k + 1))
    # shellcheck disable=SC2086 # each entry is a command line
    valgrind --tool=callgrind --demangle=no --callgrind-out-file="$client/cg.client.$k" \
        "${c[@]}" $args >/dev/null 2>&1 || true
done
"${c[@]}" stop >/dev/null

# Every function of drover's own object with a cost after the zeroing,
# in either profile (the zeroing dropped start-up's counts).
nm --defined-only "$drover" > "$work/symbols"
objdump -d --no-show-raw-insn "$drover" > "$work/code"
python3 - "$work" "$repo/link/hot-code.txt" <<'PY'
import glob, re, sys
work, out = sys.argv[1], sys.argv[2]
# name -> nm type letter, for the functions (t/T) and read-only data (r/R).
kinds = {}
for line in open(f"{work}/symbols"):
    parts = line.split()
    if len(parts) == 3:
        kinds[parts[2]] = parts[1].lower()
# drover's own spawn, which the profile could not run (see above), and
# what calls it and makes its cgroups (their fallback ran instead).
modules = ("6drover2os5spawn", "6drover2os6cgroup", "6drover10supervisor5child", "6drover10supervisor11containment")
hot = {name for name, kind in kinds.items() if kind == "t" and any(m in name for m in modules)}


def callees():
    """Each function's direct calls and jumps to other functions, from
    objdump's `<symbol>` naming of each target."""
    out, current = {}, None
    for line in open(f"{work}/code"):
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            current = out.setdefault(head.group(1), set())
        elif current is not None and ("call" in line or "jmp" in line):
            target = re.search(r"<([^<>+]+)>$", line.rstrip())
            if target and kinds.get(target.group(1)) == "t":
                current.add(target.group(1))
    return out


# What those modules call, two calls deep: valgrind never ran them either.
calls = callees()
frontier = set(hot)
for _ in range(2):
    frontier = {c for f in frontier for c in calls.get(f, ())} - hot
    hot |= frontier


def functions(path):
    """drover's own functions with a cost in one callgrind profile."""
    found = set()
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
            # Rust's and the bundled C's (sqlite, the maths shims) alike.
            if fn in kinds and kinds[fn] == "t":
                found.add(fn)
    return found


for path in glob.glob(f"{work}/*/cg.out*"):
    hot |= functions(path)
client = set()
for path in glob.glob(f"{work}/client/cg.client.*"):
    client |= functions(path)
client -= hot


def data_of(functions):
    """The named read-only data the functions' code refers to (tables,
    statics): objdump names each rip-relative target `<symbol+offset>`.
    Laid out together too, as faulting one in maps 64 KiB around it."""
    found, inside = set(), False
    for line in open(f"{work}/code"):
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            inside = head.group(1) in functions
        elif inside:
            for ref in re.findall(r"<([^<>+]+)(?:\+0x[0-9a-f]+)?>", line):
                if kinds.get(ref) == "r":
                    found.add(ref)
    return found


data = data_of(hot)
client_data = data_of(client) - data
order = sorted(hot) + sorted(client) + sorted(data) + sorted(client_data)
open(out, "w").write("".join(f"{f}\n" for f in order))
print(f"{len(hot)} supervisor and {len(client)} client functions, {len(data) + len(client_data)} read-only data symbols "
      f"written to {out}", file=sys.stderr)
PY
