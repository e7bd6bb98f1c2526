#!/usr/bin/env bash
# Schedule SEEDS training runs of one task, one Slurm job each, or SEEDS_PER_PROCESS seeds per job (on this
# machine, a few processes at a time, where there is no sbatch), with the configuration set below:
#
#   ./run_cluster.sh walker walk [more sacae train flags, which win over the ones below]
#   ./run_cluster.sh gymnasium:HalfCheetah-v5 [more sacae train flags]      (a Gymnasium environment)
#
# Output goes to $RUNS_DIR/<domain>_<task>/<configuration>/seed_<i>/ (gymnasium-<id>/... for a Gymnasium
# environment; configuration: sac_ae, sac_pixel or sac_states, from ENCODER_TYPE and DECODER_TYPE). Running the
# same command again skips finished runs, leaves queued or running ones alone and resumes the others.
# `sacae status runs` shows where they stand.
# Every variable can also be set from the environment, e.g. SEEDS=3 ENCODER_TYPE=identity ./run_cluster.sh ...
set -euo pipefail

# ---- the configuration (the defaults are the paper's hyperparameters, docs/ALGORITHM.md) -------------------
ENCODER_TYPE=${ENCODER_TYPE:-pixel}            # pixel | identity  sac_ae:     pixel    pixel
DECODER_TYPE=${DECODER_TYPE:-pixel}            # pixel | identity  sac_pixel:  pixel    identity
#                                                                  sac_states: identity identity
ACTION_REPEAT=${ACTION_REPEAT:-}               # empty: the PlaNet value of the domain for pixel runs, 1 for states
NUM_TRAIN_STEPS=${NUM_TRAIN_STEPS:-1000000}    # agent steps (environment steps / action repeat)
INIT_STEPS=${INIT_STEPS:-1000}                 # random-action seed phase, agent steps
BATCH_SIZE=${BATCH_SIZE:-128}
EVAL_FREQ=${EVAL_FREQ:-10000}                  # agent steps between evaluations
NUM_EVAL_EPISODES=${NUM_EVAL_EPISODES:-10}
OUTPUTS=${OUTPUTS---save_tb --save_video}      # add --save_model for network snapshots; empty: none

# ---- how many runs and where -------------------------------------------------------------------------------
SEEDS=${SEEDS:-10}                             # seeds 1..SEEDS
SEEDS_PER_PROCESS=${SEEDS_PER_PROCESS:-1}      # seeds trained together by one job (sacae train-seeds, one GPU)
RUNS_DIR=${RUNS_DIR:-runs}
DRY_RUN=${DRY_RUN:-}                           # 1: print the runs that would be scheduled, start nothing

# ---- Slurm (empty: the cluster's default) --------------------------------------------------------------------
EXECUTOR=${EXECUTOR:-auto}                     # auto (slurm when sbatch exists) | slurm | local
PARTITION=${PARTITION:-}
TIME=${TIME:-}                                 # e.g. 72:00:00
CPUS=${CPUS:-}                                 # cores per job
GPUS=${GPUS:-}                                 # default: 1 for pixel configurations, 0 for sac_states
MEM=${MEM:-auto}                               # e.g. 32G; auto: the replay buffer plus 3 GB
ACCOUNT=${ACCOUNT:-}
SIGNAL_SECONDS=${SIGNAL_SECONDS:-300}          # checkpoint and requeue this long before the time limit
SBATCH_OPTIONS=${SBATCH_OPTIONS:-}             # more sbatch options, e.g. "qos=high constraint=volta32gb"
# -------------------------------------------------------------------------------------------------------------

if [ $# -ge 1 ] && [[ $1 == gymnasium:* ]]; then
  RUN_TASK=$1
  shift 1
elif [ $# -ge 2 ]; then
  RUN_TASK=${1}_${2}
  shift 2
else
  echo "usage: $0 DOMAIN TASK [sacae train flags]   (e.g. $0 walker walk), or $0 gymnasium:ID [sacae train flags]" >&2
  exit 2
fi

# The sacae of this checkout's .venv when there is one, else the one on PATH ($SACAE wins over both).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${SACAE:-}" ]; then
  if [ -x "$HERE/.venv/bin/sacae" ]; then SACAE=$HERE/.venv/bin/sacae; else SACAE=sacae; fi
fi

sweep=(--tasks "$RUN_TASK" --num_seeds "$SEEDS" --seeds_per_process "$SEEDS_PER_PROCESS" --runs_dir "$RUNS_DIR"
       --executor "$EXECUTOR" --mem "$MEM" --signal_seconds "$SIGNAL_SECONDS")
[ -n "$PARTITION" ] && sweep+=(--partition "$PARTITION")
[ -n "$TIME" ] && sweep+=(--time "$TIME")
[ -n "$CPUS" ] && sweep+=(--cpus_per_task "$CPUS")
[ -n "$GPUS" ] && sweep+=(--gpus "$GPUS")
[ -n "$ACCOUNT" ] && sweep+=(--account "$ACCOUNT")
[ -n "$DRY_RUN" ] && sweep+=(--dry_run)
# ${train[@]+...} below: an empty array under set -u is an error on bash < 4.4 (macOS).
train=()
[ -n "$ACTION_REPEAT" ] && train+=(--action_repeat "$ACTION_REPEAT")
# shellcheck disable=SC2206  # SBATCH_OPTIONS and OUTPUTS are word lists
[ -n "$SBATCH_OPTIONS" ] && sweep+=(--sbatch_options $SBATCH_OPTIONS)

# shellcheck disable=SC2086
exec "$SACAE" sweep "${sweep[@]}" -- \
  --encoder_type "$ENCODER_TYPE" --decoder_type "$DECODER_TYPE" \
  --num_train_steps "$NUM_TRAIN_STEPS" --init_steps "$INIT_STEPS" --batch_size "$BATCH_SIZE" \
  --eval_freq "$EVAL_FREQ" --num_eval_episodes "$NUM_EVAL_EPISODES" $OUTPUTS ${train[@]+"${train[@]}"} \
  "$@"
