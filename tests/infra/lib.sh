# Shared by the steps in tests/infra/ (sourced, not run): logging, the state directory, apt, and
# a runner that shows progress while a long command writes to its log.
# shellcheck shell=bash

readonly INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_DIR="$(cd "$INFRA_DIR/../.." && pwd)"
# dockerd.log, dockerd.pid, the debootstrap cache and the step logs.
STATE_DIR="${TRACKGATE_DOCKER_STATE:-/var/tmp/trackgate-docker}"

# The images the container tiers use. The base is our own name: never an upstream one such as
# debian:bookworm-slim, which a local build must not shadow. Dockerfiles take it as a build arg.
# tests/infra/ready.py names the same images for the Python side.
readonly SUITE=bookworm
readonly BASE_IMAGE="trackgate-base:$SUITE"
readonly SYSTEMD_IMAGE="trackgate/systemd-host:$SUITE"

log() { printf '[infra %s] %s\n' "${STEP:-?}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

require_root() {
  [[ $EUID -eq 0 ]] || die "run as root (installs packages, starts dockerd, runs debootstrap)"
  mkdir -p "$STATE_DIR"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# run_logged LABEL LOG CMD...: run CMD with its output in LOG; every 15 s say how long it has
# been running and its last log line; on failure show the log's tail.
run_logged() {
  local label="$1" logfile="$2" pid rc=0 t0=$SECONDS last
  shift 2
  log "$label (log: $logfile)"
  "$@" >"$logfile" 2>&1 </dev/null &
  pid=$!
  while ! wait_for "$pid" 15; do
    last="$(tail -n 1 "$logfile" 2>/dev/null | cut -c 1-100)"
    log "$label: $((SECONDS - t0))s${last:+ - $last}"
  done
  wait "$pid" || rc=$?
  if ((rc != 0)); then
    tail -n 30 "$logfile" >&2
    die "$label failed (exit $rc; full log: $logfile)"
  fi
  log "$label: done in $((SECONDS - t0))s"
}

# wait_for PID SECONDS: true once PID has exited, false if it still runs after SECONDS.
wait_for() {
  local i
  for ((i = 0; i < $2 * 2; i++)); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.5
  done
  ! kill -0 "$1" 2>/dev/null
}

# apt_install PKG...: install only what is missing; `apt-get update` first when the package lists
# are missing or do not know a package (a fresh machine, stale lists).
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
  if ! apt-get install -y -q --simulate "${missing[@]}" >/dev/null 2>&1; then
    run_logged "apt-get update" "$STATE_DIR/apt-update.log" apt-get update
  fi
  run_logged "apt-get install ${missing[*]}" "$STATE_DIR/apt.log" apt-get install -y -q "${missing[@]}"
}
