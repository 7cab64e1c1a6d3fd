#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (apt packages,
# the venv, Docker with locally built base images), then runs every tier with real components.
#   bash scripts/test.sh              # all tiers: fast, security, reliability, deploy, compose, hosts
#   bash scripts/test.sh fast         # or any of them (several allowed)
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
tiers=("$@")
all_tiers=(fast security reliability deploy compose hosts)
((${#tiers[@]})) || tiers=("${all_tiers[@]}")
for tier in "${tiers[@]}"; do
  [[ " ${all_tiers[*]} " == *" $tier "* ]] || { echo "unknown tier '$tier' (${all_tiers[*]})" >&2; exit 2; }
done

say() { printf '\n[test] %s  (%ss elapsed)\n' "$*" "$SECONDS" >&2; }

say "installing test requirements"
VENV="$VENV" bash scripts/install.sh --test

needs_docker=false
for tier in "${tiers[@]}"; do [[ "$tier" == deploy || "$tier" == hosts || "$tier" == compose ]] && needs_docker=true; done
if $needs_docker; then
  say "making Docker ready (engine, compose plugin, local base images; minutes the first time)"
  TRACKGATE_PYTHON="$VENV/bin/python" bash tests/infra/docker-ready.sh
fi

declare -A marker=(
  [fast]="not deploy and not compose and not security and not reliability"  # with the 1 GB round trip
  [security]="security"          # issue 12's attacks against real stacks
  [reliability]="reliability"    # backup/restore, kills, upgrades, rotation
  [deploy]="deploy and not hosts"  # one systemd host per inventory
  [hosts]="hosts"                # several systemd hosts: the multi-host inventory (issue 16)
  [compose]="compose"
)
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT

# run_tier TIER: one pytest run; its exit code lands in $reports/TIER.code.
run_tier() {
  local tier=$1 code
  say "tier: $tier"
  set +e
  # Each tier its own temp root: two tiers running at once never share pytest's numbered dirs.
  "$VENV/bin/python" -m pytest -m "${marker[$tier]}" --junitxml "$reports/$tier.xml" \
    --basetemp "$reports/tmp-$tier" tests
  code=$?
  set -e
  # Any non-zero exit fails, including 5 (no tests collected): a tier that ran nothing is broken.
  ((code == 5)) && echo "[test] tier $tier collected no tests" >&2
  echo "$code" >"$reports/$tier.code"
  say "tier $tier finished (exit $code)"
}

# Three lanes at once: the Docker tiers spend most of their time waiting on containers and
# ansible, the others on local servers; together they take about the longest lane's time. The
# multi-host tier (four containers, three playbooks) follows compose, so its hosts never install
# PostgreSQL beside the single-host deploy tier's (systemd containers share the host's network).
# TRACKGATE_TEST_LANES=1 runs everything one tier after another.
declare -A lane_of=([deploy]=deploy [compose]=compose [hosts]=compose)
declare -A lanes=()
for tier in "${tiers[@]}"; do
  lane=${lane_of[$tier]:-local}
  lanes[$lane]="${lanes[$lane]:-} $tier"
done
if [[ "${TRACKGATE_TEST_LANES:-3}" == 1 ]] || ((${#lanes[@]} == 1)); then
  for tier in "${tiers[@]}"; do run_tier "$tier"; done
else
  lane_pids=()
  for lane in deploy compose; do
    [[ -n "${lanes[$lane]:-}" ]] || continue
    # shellcheck disable=SC2086  # the lane's tiers, split on purpose
    ( for tier in ${lanes[$lane]}; do run_tier "$tier"; done ) 2>&1 | sed -u "s/^/[$lane lane] /" &
    lane_pids+=($!)
  done
  # shellcheck disable=SC2086
  for tier in ${lanes[local]:-}; do run_tier "$tier"; done
  for pid in "${lane_pids[@]}"; do wait "$pid" || true; done
fi
failed=()
for tier in "${tiers[@]}"; do
  code=$(cat "$reports/$tier.code" 2>/dev/null || echo "none")
  [[ "$code" == 0 ]] || failed+=("$tier(exit $code)")
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
