#!/usr/bin/env bash
# Step 3: the base image every test image and compose Dockerfile builds FROM (no registry is
# reachable here, so `docker pull debian:bookworm-slim` fails). debootstrap --variant=minbase from
# the host's own Debian mirror, with the host's apt sources and Acquire:: settings (e.g. a
# snapshot mirror's validity check), then `docker import` as $BASE_IMAGE (trackgate-base:bookworm).
# Built only when missing; --rebuild replaces it.
set -Eeuo pipefail
STEP=base-image
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOTFS=""
cleanup() {
  [[ -n "$ROOTFS" && -d "$ROOTFS" ]] || return 0
  # A failed debootstrap leaves proc/sys mounted inside the target: unmount before deleting.
  local mnt
  while read -r _ mnt _; do
    [[ "$mnt" == "$ROOTFS"/* ]] && umount -l "$mnt" 2>/dev/null || true
  done < <(tac /proc/mounts)
  rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT

require_root
if [[ "${1:-}" != --rebuild ]] && image_exists "$BASE_IMAGE"; then
  log "$BASE_IMAGE present"
  exit 0
fi
command -v debootstrap >/dev/null || apt_install debootstrap

# The host's mirror for the suite, and the sources file it comes from (apt resolves both; no
# parsing of sources files here).
read -r entry mirror < <(apt-get indextargets --format '$(SOURCESENTRY) $(REPO_URI)' \
  "Release: $SUITE" 'Identifier: Packages' | head -n 1) \
  || die "the host's apt sources have no '$SUITE' suite to debootstrap from"
sources="${entry%:*}"

ROOTFS="$(mktemp -d "${TMPDIR:-/var/tmp}/trackgate-rootfs.XXXXXX")"
mkdir -p "$STATE_DIR/debootstrap-cache"
log "building $BASE_IMAGE: debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
run_logged debootstrap "$STATE_DIR/debootstrap.log" \
  debootstrap --variant=minbase --cache-dir="$STATE_DIR/debootstrap-cache" "$SUITE" "$ROOTFS" "$mirror"

# apt inside the image: the host's Debian sources (main, updates, security) and their keyrings...
rm -f "$ROOTFS/etc/apt/sources.list"
install -D -m 0644 "$sources" "$ROOTFS$sources"
for keyring in $(grep -oiE 'signed-by:?[[:space:]=]*/[^] ,]+' "$sources" | grep -o '/.*' || true); do
  [[ -f "$keyring" && ! -e "$ROOTFS$keyring" ]] && install -D -m 0644 "$keyring" "$ROOTFS$keyring"
done
# ...and the host's apt.conf.d snippets that only set Acquire:: options.
for conf in /etc/apt/apt.conf.d/*; do
  [[ -f "$conf" ]] || continue
  settings="$(grep -vE '^[[:space:]]*(//|#|$)' "$conf" || true)"
  if [[ -n "$settings" ]] && ! grep -qvE '^[[:space:]]*Acquire::' <<<"$settings"; then
    cp "$conf" "$ROOTFS/etc/apt/apt.conf.d/"
  fi
done
# No package caches or lists, and no identity of the build host (docker mounts its own).
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS/var/log/bootstrap.log"
mkdir -p "$ROOTFS/var/lib/apt/lists/partial"
: >"$ROOTFS/etc/resolv.conf"
echo localhost >"$ROOTFS/etc/hostname"

log "docker import as $BASE_IMAGE"
tar -C "$ROOTFS" --numeric-owner -c . | docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
log "built $BASE_IMAGE"
