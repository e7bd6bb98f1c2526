#!/usr/bin/env bash
# Schedule the whole testbed: run_cluster.sh for each of the ten dm_control tasks of sacae.testbed, with the
# testbed's action repeat (the PlaNet one of its domain, what pixel runs use; the published state-based
# results use 1: add --action_repeat 1 for sac_states). Extra flags go to every run and win over those:
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
for task, action_repeat in TESTBED:
    print(*split_task_name(task), action_repeat)
') || { echo "$0: cannot read the testbed with $PYTHON (set PYTHON to the Python that has sacae)" >&2; exit 2; }

failed=()
while read -r domain task action_repeat; do
  "$HERE/run_cluster.sh" "$domain" "$task" --action_repeat "$action_repeat" "$@" </dev/null || failed+=("${domain}_${task}")
done <<< "$testbed"

if [ ${#failed[@]} -gt 0 ]; then
  echo "$0: run_cluster.sh failed for: ${failed[*]}" >&2
  exit 1
fi
