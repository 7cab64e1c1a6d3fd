#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (apt packages,
# the venv, Docker with locally built base images), then runs every tier with real components.
#   bash scripts/test.sh              # all tiers: fast, security, reliability, deploy, compose
#   bash scripts/test.sh fast         # or any of them (several allowed)
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
tiers=("$@")
all_tiers=(fast security reliability deploy compose)
((${#tiers[@]})) || tiers=("${all_tiers[@]}")
for tier in "${tiers[@]}"; do
  [[ " ${all_tiers[*]} " == *" $tier "* ]] || { echo "unknown tier '$tier' (${all_tiers[*]})" >&2; exit 2; }
done

say() { printf '\n[test] %s  (%ss elapsed)\n' "$*" "$SECONDS" >&2; }

say "installing test requirements"
VENV="$VENV" bash scripts/install.sh --test

needs_docker=false
for tier in "${tiers[@]}"; do [[ "$tier" == deploy || "$tier" == compose ]] && needs_docker=true; done
if $needs_docker; then
  say "making Docker ready (engine, compose plugin, local base images; minutes the first time)"
  TRACKGATE_PYTHON="$VENV/bin/python" bash tests/infra/docker-ready.sh
fi

declare -A marker=(
  [fast]="not deploy and not compose and not security and not reliability"  # with the 1 GB round trip
  [security]="security"          # issue 12's attacks against real stacks
  [reliability]="reliability"    # backup/restore, kills, upgrades, rotation
  [deploy]="deploy"
  [compose]="compose"
)
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
failed=()
for tier in "${tiers[@]}"; do
  say "tier: $tier"
  set +e
  "$VENV/bin/python" -m pytest -m "${marker[$tier]}" --junitxml "$reports/$tier.xml" tests
  code=$?
  set -e
  # Any non-zero exit fails, including 5 (no tests collected): a tier that ran nothing is broken.
  if ((code != 0)); then
    ((code == 5)) && echo "[test] tier $tier collected no tests" >&2
    failed+=("$tier(exit $code)")
  fi
done

say "finished"
if ((${#failed[@]})); then
  echo "[test] FAILED tiers: ${failed[*]}" >&2
else
  echo "[test] all tiers passed: ${tiers[*]}" >&2
fi
# The closing line: one count for the whole run, summed over the tiers' reports.
"$VENV/bin/python" - "$reports" <<'PY'
import pathlib, sys, xml.etree.ElementTree as ET
n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for report in pathlib.Path(sys.argv[1]).glob("*.xml"):
    for suite in ET.parse(report).getroot().iter("testsuite"):
        for key in n:
            n[key] += int(suite.get(key, 0))
bad = n["failures"] + n["errors"]
print(f"total: {n['tests'] - bad - n['skipped']} passed, {bad} failed, {n['skipped']} skipped")
PY
((${#failed[@]} == 0))
