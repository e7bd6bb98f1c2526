#!/usr/bin/env bash
# Schedule the whole testbed: run_cluster.sh for each of the ten dm_control tasks of sacae.testbed. Each run takes
# the action repeat of its configuration (pixel runs: the PlaNet value of the domain, which is the testbed's; state
# runs: 1) unless ACTION_REPEAT is set in run_cluster.sh. Extra flags go to every run and win over those:
#
#   ./run_all.sh [sacae train flags]
#
# Change the configuration in run_cluster.sh. Without Slurm each task's runs finish before the next task starts.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON=$HERE/.venv/bin/python; else PYTHON=python3; fi
fi
testbed=$("$PYTHON" -c '
from sacae.envs import split_task_name
from sacae.testbed import TESTBED
for task, _ in TESTBED:
    print(*split_task_name(task))
') || { echo "$0: cannot read the testbed with $PYTHON (set PYTHON to the Python that has sacae)" >&2; exit 2; }

failed=()
while read -r domain task; do
  "$HERE/run_cluster.sh" "$domain" "$task" "$@" </dev/null || failed+=("${domain}_${task}")
done <<< "$testbed"

if [ ${#failed[@]} -gt 0 ]; then
  echo "$0: run_cluster.sh failed for: ${failed[*]}" >&2
  exit 1
fi
