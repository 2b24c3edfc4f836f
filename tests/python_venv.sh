# Sourced by the checks that need a Python package: `python_venv PKG…`
# makes (once) a cached venv, installs into it the packages it lacks, and
# puts it first on PATH. Works on a fresh Debian or Ubuntu machine, where
# venv and ensurepip are packaged apart from python3.
python_venv() {
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/drover-ci/venv"
  if [ ! -x "$venv/bin/pip" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
      command -v apt-get >/dev/null && { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
      rm -rf "$venv"
      python3 -m venv "$venv"
    fi
  fi
  local pkg
  for pkg in "$@"; do
    "$venv/bin/pip" show --quiet "$pkg" >/dev/null 2>&1 || "$venv/bin/pip" install --quiet "$pkg"
  done
  PATH="$venv/bin:$PATH"
}
