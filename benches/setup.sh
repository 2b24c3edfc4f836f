#!/usr/bin/env bash
# Installs the peers that benches/compare.py measures drover against, if they
# are missing. Idempotent: a second run does nothing but check.
#
#   runit        Debian package (runsvdir, runsv, sv); the system's init is untouched
#   s6           Debian package (s6-svscan, s6-supervise, s6-svc, s6-svscanctl, s6-svstat)
#   supervisord  PyPI `supervisor` (supervisord, supervisorctl)
#   pm2          npm `pm2`, installed under benches/.tools/node_modules
#   horust       crates.io `horust` and `horustctl`, installed under benches/.tools/bin
#
# benches/.tools is local and gitignored. Set SKIP=horust,pm2 to skip some.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="$here/.tools"
mkdir -p "$tools"
skip=",${SKIP:-},"

log() { printf 'setup: %s\n' "$*" >&2; }
skipped() { [[ "$skip" == *",$1,"* ]]; }

sudo=""
if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then sudo="sudo"; fi

# --- runit -----------------------------------------------------------------
if ! skipped runit; then
    if command -v runsvdir >/dev/null && command -v sv >/dev/null; then
        log "runit: present ($(command -v runsvdir))"
    else
        log "runit: installing (Debian package runit)"
        # Only update the package lists when apt cannot see the package yet.
        if ! apt-cache show runit >/dev/null 2>&1; then
            $sudo apt-get update -qq
        fi
        # runit's postinst does not take over init; runit-init is a separate package.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends runit
    fi
fi

# --- s6 --------------------------------------------------------------------
if ! skipped s6; then
    if command -v s6-svscan >/dev/null && command -v s6-svscanctl >/dev/null && command -v s6-svstat >/dev/null; then
        log "s6: present ($(command -v s6-svscan))"
    else
        log "s6: installing (Debian package s6)"
        if ! apt-cache show s6 >/dev/null 2>&1; then
            $sudo apt-get update -qq
        fi
        # Only the tools: nothing is started and init is untouched.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends s6
    fi
fi

# --- supervisord -------------------------------------------------------------
if ! skipped supervisord; then
    if python3 -c 'import supervisor' 2>/dev/null && command -v supervisord >/dev/null \
        && command -v supervisorctl >/dev/null; then
        log "supervisord: present ($(command -v supervisord))"
    else
        log "supervisord: installing (PyPI supervisor)"
        python3 -m pip install -q supervisor
        # pyenv shims need a rehash to expose new console scripts
        if command -v pyenv >/dev/null; then pyenv rehash || true; fi
    fi
fi

# --- pm2 ---------------------------------------------------------------------
if ! skipped pm2; then
    if [[ -x "$tools/node_modules/.bin/pm2" ]]; then
        log "pm2: present ($tools/node_modules/.bin/pm2)"
    else
        command -v npm >/dev/null || { log "pm2: npm is missing (install nodejs/npm)"; exit 1; }
        log "pm2: installing (npm pm2 into $tools)"
        npm install --prefix "$tools" --no-audit --no-fund --loglevel=error pm2
    fi
fi

# --- horust ------------------------------------------------------------------
# horust itself, and horustctl (its status client over a Unix socket).
if ! skipped horust; then
    for crate in horust horustctl; do
        if [[ -x "$tools/bin/$crate" ]]; then
            log "$crate: present ($tools/bin/$crate)"
        else
            command -v cargo >/dev/null || { log "$crate: cargo is missing"; exit 1; }
            log "$crate: compiling (cargo install $crate into $tools; takes a minute or two)"
            # nice: do not starve other builds on a small machine
            nice -n 10 cargo install --locked --quiet --root "$tools" "$crate"
        fi
    done
fi

log "done"
