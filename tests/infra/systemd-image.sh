#!/usr/bin/env bash
# Step 4: the systemd host image of the Ansible tier ($SYSTEMD_IMAGE), from systemd-host.Dockerfile
# on the base image. Built only when missing; --rebuild replaces it.
set -Eeuo pipefail
STEP=systemd-image
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_root
if [[ "${1:-}" != --rebuild ]] && image_exists "$SYSTEMD_IMAGE"; then
  log "$SYSTEMD_IMAGE present"
  exit 0
fi
image_exists "$BASE_IMAGE" || die "$BASE_IMAGE missing: run tests/infra/base-image.sh first"
# --network host: apt needs the mirror and the engine runs without NAT. The Dockerfile comes on
# stdin: the image copies nothing, so there is no build context to send.
build() {
  docker build --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$SYSTEMD_IMAGE" - \
    <"$INFRA_DIR/systemd-host.Dockerfile"
}
log "building $SYSTEMD_IMAGE FROM $BASE_IMAGE (about a minute)"
run_logged "docker build" "$STATE_DIR/systemd-image.log" build
