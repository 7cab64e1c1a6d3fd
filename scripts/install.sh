#!/usr/bin/env bash
# Install what trackgate needs on Debian/Ubuntu: nginx, a Python venv, and this package.
# Re-runnable: it installs only what is missing. `--test` adds what the test suite needs.
#   bash scripts/install.sh            # then: .venv/bin/trackgate up
#   bash scripts/install.sh --test     # used by scripts/test.sh
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
with_tests=false
[[ "${1:-}" == "--test" ]] && with_tests=true

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || die "run as root, or install sudo"
  sudo="sudo"
fi

# --- pre-flight: decide what is missing; nothing is changed yet ----------------------------
command -v apt-get >/dev/null || die "this script needs Debian or Ubuntu (apt-get); on other systems install nginx and Python >= 3.11, then: python3 -m venv .venv && .venv/bin/pip install -e ."
packages=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in nginx-light python3-venv openssl ca-certificates; do
  have_pkg "$pkg" || packages+=("$pkg")
done
if $with_tests; then
  # Real nginx, real Chromium for browser tests, curl for raw HTTP checks.
  # PostgreSQL 15: the reliability tier backs up and restores a real cluster.
  for pkg in chromium curl util-linux postgresql; do have_pkg "$pkg" || packages+=("$pkg"); done
fi
# Metrics (issue 17): nginx's exporter on stub_status (optional: `trackgate up` runs it when
# installed). The tests also run Prometheus and promtool (alert rules).
for pkg in prometheus-nginx-exporter; do have_pkg "$pkg" || packages+=("$pkg"); done
if $with_tests; then
  for pkg in prometheus; do have_pkg "$pkg" || packages+=("$pkg"); done
fi
# nginx from another source (e.g. nginx.org's package) is fine too.
if command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]]; then
  packages=("${packages[@]/nginx-light}")
fi

# --- changes -------------------------------------------------------------------------------
packages=(${packages[@]+"${packages[@]}"})
if ((${#packages[@]})); then
  say "apt-get install ${packages[*]} (a minute or two on a fresh machine)"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  # `trackgate up` runs the exporter itself (on its metrics listener): the units of packages
  # installed just now would start with no target and keep failing (prometheus: a server on
  # port 9090 nobody asked for). Units of packages that were already here are left alone.
  if [[ -d /run/systemd/system ]]; then
    for unit in prometheus-nginx-exporter prometheus; do
      if [[ " ${packages[*]} " == *" $unit "* ]]; then
        $sudo systemctl disable --now --quiet "$unit" || true
      fi
    done
  fi
fi

# Debian's python3 makes a venv that any user can run (a pyenv under /root would not be).
python=python3
[[ -x /usr/bin/python3 ]] && python=/usr/bin/python3
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python >= 3.11 is needed ($python is $("$python" --version 2>&1))"
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating the virtualenv $VENV"
  "$python" -m venv "$VENV"
fi
extras=""
$with_tests && extras="[test]"
say "installing trackgate$extras into $VENV (mlflow and its dependencies: a few minutes the first time)"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".$extras"
say "done: $("$VENV/bin/trackgate" --version)"
