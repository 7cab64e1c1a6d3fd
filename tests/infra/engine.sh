#!/usr/bin/env bash
# Step 1: the Docker engine. Installs Debian's docker.io if missing and, on a machine without
# systemd as PID 1, starts `dockerd --iptables=false` itself (no NAT here: builds use host
# networking) and keeps its PID in $STATE_DIR/dockerd.pid.
#   tests/infra/engine.sh          # start if not answering
#   tests/infra/engine.sh --stop   # stop the dockerd this step started (only that one)
set -Eeuo pipefail
STEP=engine
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PID_FILE="$STATE_DIR/dockerd.pid"
LOG_FILE="$STATE_DIR/dockerd.log"

docker_ok() { timeout 20 docker info >/dev/null 2>&1; }

# The recorded PID, if that process still is a dockerd (guards against PID reuse).
our_dockerd() {
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ && "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]] || return 1
  printf '%s\n' "$pid"
}

start() {
  # Debian's engine unless one is installed already (e.g. docker-ce).
  command -v dockerd >/dev/null || apt_install docker.io
  docker_ok && return 0
  if [[ -d /run/systemd/system ]]; then
    log "starting docker.service"
    systemctl start docker.service
  elif ! our_dockerd >/dev/null; then
    log "starting dockerd --iptables=false (log: $LOG_FILE)"
    # setsid: dockerd outlives this script; 9>&-: it must not hold the steps' lock.
    setsid dockerd --iptables=false >>"$LOG_FILE" 2>&1 </dev/null 9>&- &
    echo "$!" >"$PID_FILE"
  fi
  local i
  for ((i = 0; i < 60; i++)); do
    if docker_ok; then log "engine answering after ${i}s (dockerd pid $(our_dockerd || echo '?'))"; return 0; fi
    if [[ ! -d /run/systemd/system ]] && ! our_dockerd >/dev/null; then
      tail -n 30 "$LOG_FILE" >&2
      die "dockerd exited while starting (log: $LOG_FILE)"
    fi
    sleep 1
  done
  tail -n 30 "$LOG_FILE" >&2
  die "docker info still fails after 60 s (log: $LOG_FILE)"
}

stop() {
  local pid i
  if ! pid="$(our_dockerd)"; then
    log "no dockerd started by this step is running"
    rm -f "$PID_FILE"
    return 0
  fi
  log "stopping dockerd pid $pid"
  kill -TERM "$pid"
  for ((i = 0; i < 60; i++)); do
    [[ -d "/proc/$pid" ]] || { rm -f "$PID_FILE"; log "stopped"; return 0; }
    sleep 0.5
  done
  die "dockerd pid $pid still running after 30 s"
}

require_root
case "${1:-}" in
  "") start ;;
  --stop) stop ;;
  *) die "usage: $0 [--stop]" ;;
esac
