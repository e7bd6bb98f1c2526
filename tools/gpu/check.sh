#!/usr/bin/env bash
# check.sh - every GPU figure of sacae in one command of a fixed time budget (docs/performance.md, "The GPU check").
#
#     tools/gpu/check.sh [--device cuda|cpu] [--tiny] [--budget SECONDS]       (default: cuda, 420 s)
#
# On the GPU machine, after `bash ../shared/tools/gpu/prepare.sh` here (with pytest among its extra packages):
#     source .gpu/setup.sh && bash tools/gpu/check.sh
# Here, the plumbing at tiny sizes on the CPU (about two minutes):
#     PYTHON=.venv/bin/python tools/gpu/check.sh --device cpu --tiny --budget 150
#
# Parts, in this order, each under its own time limit (GNU timeout) so that a failing or slow part is reported and
# the next one still runs; each writes OUT/<part>.out, OUT/<part>.err and OUT/<part>.status.json:
#   pytest          pytest -m cuda tests/test_cuda.py (junit XML in OUT/pytest.xml)
#   bench           sacae bench: eager update medians (fp32 and bf16), the authors'-style update, the environment
#                   step (physics and render), steady training on cheetah_run with the overlap off and on, memory
#   bench_compiled  sacae bench --only update --compile on: compiled update medians (fp32 and bf16)
#   group           sacae bench --only group: agent steps/s of 1, 4 and 10 seeds in one process (cheetah_run)
#   learning        sacae train-seeds: cartpole_swingup sac_ae, 10 seeds in one process, towards 100k env steps
#                   with the time left; stopped with SIGTERM (the trainer checkpoints, exit 143) before the budget
#                   ends; the seeds' config.json, train.log, eval.log and status.json go to OUT/learning.tgz
# A part's limit is its share of the budget, less what is needed for the parts after it; time a part leaves
# unused goes to the learning run. At the end: one table and one JSON line (also OUT/summary.json), from
# tools/gpu/summary.py. OUT defaults to ./gpu-check-out. Exit status 0 when every part is ok, else 1.
#
# For tests: SACAE_CHECK_FAIL=part[,part] makes those parts fail at once; SACAE_CHECK_LIMIT_<PART>=SECONDS sets a
# part's limit (e.g. SACAE_CHECK_LIMIT_BENCH=2); SACAE_CHECK_LEARN_STEPS sets the learning run's agent steps.
set -uo pipefail

device=cuda tiny=0 budget=420
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
        --device=*) device=${1#*=}; shift ;;
        --tiny) tiny=1; shift ;;
        --budget) budget=${2:?--budget needs seconds}; shift 2 ;;
        --budget=*) budget=${1#*=}; shift ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in cuda|cuda:*|cpu) ;; *) echo "check.sh: --device must be cuda or cpu (got $device)" >&2; exit 2 ;; esac
case "$budget" in ''|*[!0-9]*) echo "check.sh: --budget must be whole seconds (got $budget)" >&2; exit 2 ;; esac

for tool in timeout awk tar find mktemp; do
    command -v "$tool" > /dev/null || { echo "check.sh: $tool is needed and not installed" >&2; exit 2; }
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root" || exit 2
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "check.sh: cannot create $OUT" >&2; exit 2; }
# What an earlier check left in OUT goes first (its runs would otherwise be resumed, its statuses read).
rm -rf "$OUT/runs" "$OUT/learning.tgz" "$OUT/summary.json" "$OUT/check.json" "$OUT/pytest.xml" "$OUT"/*.status.json \
    "$OUT"/*.partial.json "$OUT"/{pytest,bench,bench_compiled,group,learning}.{out,err}
# The project from its source tree: no install needed (the GPU machine has none).
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1
export SACAE_DEBUG=${SACAE_DEBUG:-1}  # a part that fails shows its traceback in OUT/<part>.err
# A compiler cache of the check's own, emptied after a part that ran out of time: a compile stopped midway leaves
# truncated files, which the next compile would load and fail on.
inductor_cache=${SACAE_CHECK_COMPILE_CACHE:-${TMPDIR:-/tmp}/sacae-check-inductor-$(id -u)}
export TORCHINDUCTOR_CACHE_DIR=$inductor_cache TRITON_CACHE_DIR=$inductor_cache/triton

now() { date +%s.%N; }
start=$(now)
elapsed() { awk -v a="$start" -v b="$(now)" 'BEGIN { printf "%d", b - a }'; }
remaining() { echo $((budget - $(elapsed))); }

# Shares of the budget (the learning run has the rest): pytest, bench, bench_compiled, group.
if [ "$tiny" = 1 ]; then
    shares=(0.1 0.25 0.3 0.2)  # no GPU tests run here; compiling on a CPU takes longest
    grace=20  # seconds the learning run has to checkpoint after SIGTERM
    sizes=(--image_size 32 --num_filters 4 --hidden_dim 32 --batch_size 8)
    bench_sizes=("${sizes[@]}" --updates 2 --warmup 1 --env_steps 2 --train_steps 2)
    # Two updates of warm-up: an even step and an odd one, each compiled once before the timing.
    compiled_sizes=("${sizes[@]}" --updates 2 --warmup 2 --configurations sac_ae --precisions fp32)
    group_sizes=("${sizes[@]}" --warmup 1 --train_steps 2 --group_seeds 1 2)
    seeds=(1 2)
    # 320 env steps: 20 agent steps of seed phase, 20 updates at once, 20 more steps; evaluations at 0 and 320.
    learn=("${sizes[@]}" --encoder_feature_dim 8 --num_train_steps "${SACAE_CHECK_LEARN_STEPS:-40}" --init_steps 20
           --eval_freq 40 --num_eval_episodes 1 --replay_buffer_capacity 10000 --num_threads 1)
else
    shares=(0.25 0.2 0.15 0.13)
    grace=60
    bench_sizes=(--updates 50 --warmup 10 --env_steps 100 --train_steps 300)
    compiled_sizes=(--updates 50 --warmup 10 --precisions fp32 bf16)
    group_sizes=(--warmup 10 --train_steps 100 --group_seeds 1 4 10)
    seeds=(1 2 3 4 5 6 7 8 9 10)
    # 100k env steps of cartpole (action repeat 8); every 20k an evaluation of 10 episodes (and a checkpoint).
    learn=(--num_train_steps "${SACAE_CHECK_LEARN_STEPS:-12500}" --eval_freq 2500 --replay_buffer_capacity 100000)
fi
final=10  # seconds kept for packing the learning logs and the summary

printf '{"device": "%s", "tiny": %s, "budget_s": %s, "grace_s": %s, "started": "%s", "python": "%s"}\n' \
    "$device" "$([ "$tiny" = 1 ] && echo true || echo false)" "$budget" "$grace" "$(date -u +%FT%TZ)" "$PY" \
    > "$OUT/check.json"
echo "check.sh: device $device, budget ${budget}s$([ "$tiny" = 1 ] && echo ', tiny sizes'), output in $OUT" >&2

forced() { case ",${SACAE_CHECK_FAIL:-}," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# run_part NAME SHARE LATER_RESERVE COMMAND...: run COMMAND under a limit of SHARE x budget seconds at most, leaving
# LATER_RESERVE seconds of the budget for the parts after it; records status ok / failed / timeout / skipped.
run_part() {
    local name=$1 share=$2 reserve=$3; shift 3
    local limit left override status rc t0 seconds
    limit=$(awk -v s="$share" -v b="$budget" 'BEGIN { printf "%d", s * b }')
    left=$(( $(remaining) - reserve ))
    [ "$limit" -gt "$left" ] && limit=$left
    override=SACAE_CHECK_LIMIT_$(echo "$name" | tr '[:lower:]' '[:upper:]')
    [ -n "${!override:-}" ] && limit=${!override}
    if forced "$name"; then
        set -- bash -c "echo 'check.sh: $name failed on purpose (SACAE_CHECK_FAIL)' >&2; exit 1"
    fi
    t0=$(now)
    if [ "$limit" -lt 1 ]; then
        status=skipped rc=-1
        echo "check.sh: no time left in the budget for $name" > "$OUT/$name.err"; : > "$OUT/$name.out"
    else
        echo "check.sh: $name (limit ${limit}s): ${describe:-$*}" >&2
        timeout -k 15 "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
        rc=$?
        case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
        [ "$status" = timeout ] && rm -rf "$inductor_cache"
    fi
    seconds=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    printf '{"part": "%s", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s}\n' \
        "$name" "$status" "$rc" "$seconds" "$limit" > "$OUT/$name.status.json"
    echo "check.sh: $name: $status (exit $rc) after ${seconds}s" >&2
}

bench=("$PY" -m sacae.cli bench --device "$device")
learn_reserve=$((grace + final + 30))

# a. the CUDA tests (pytest is not part of the GPU machine's Python: prepare.sh packs it as an extra package)
describe="pytest -m cuda tests/test_cuda.py --junitxml=$OUT/pytest.xml" \
run_part pytest "${shares[0]}" $((learn_reserve + 30)) bash -c '
    "$0" -c "import pytest" 2> /dev/null || {
        echo "pytest is not importable by $0: pack it with bash ../shared/tools/gpu/prepare.sh pytest pluggy iniconfig pygments packaging" >&2
        exit 3
    }
    exec "$0" -m pytest -m cuda tests/test_cuda.py -v -rs -p no:cacheprovider --junitxml="$1"' "$PY" "$OUT/pytest.xml"

# b. sacae bench: eager updates (the default fp32, with TF32 convolutions as torch has them, and bf16), the
# authors'-style update, the environment step, cheetah_run training (overlap off and on), GPU memory peaks
run_part bench "${shares[1]}" $((learn_reserve + 20)) "${bench[@]}" --task cartpole_swingup --train_task cheetah_run \
    --compile off --precisions fp32 bf16 --partial "$OUT/bench.partial.json" "${bench_sizes[@]}"
run_part bench_compiled "${shares[2]}" $((learn_reserve + 10)) "${bench[@]}" --only update --compile on --no_reference \
    --partial "$OUT/bench_compiled.partial.json" "${compiled_sizes[@]}"
run_part group "${shares[3]}" "$learn_reserve" "${bench[@]}" --only group --train_task cheetah_run \
    --partial "$OUT/group.partial.json" "${group_sizes[@]}"

# c. learning with the time left: SIGTERM `grace` seconds before what the summary needs, SIGKILL at the end
learn_limit=$(( $(remaining) - grace - final ))
if forced learning; then
    learning=(bash -c "echo 'check.sh: learning failed on purpose (SACAE_CHECK_FAIL)' >&2; exit 1")
else
    learning=("$PY" -m sacae.cli train-seeds --seeds "${seeds[@]}" --task cartpole_swingup --device "$device"
              --runs_dir "$OUT/runs" "${learn[@]}")
fi
t0=$(now)
if [ -n "${SACAE_CHECK_LIMIT_LEARNING:-}" ]; then learn_limit=$SACAE_CHECK_LIMIT_LEARNING; fi
if [ "$learn_limit" -lt 1 ]; then
    status=skipped rc=-1
    echo "check.sh: no time left in the budget for learning" > "$OUT/learning.err"; : > "$OUT/learning.out"
else
    echo "check.sh: learning (SIGTERM after ${learn_limit}s, SIGKILL ${grace}s later): ${learning[*]}" >&2
    timeout --preserve-status -k "$grace" "$learn_limit" "${learning[@]}" > "$OUT/learning.out" 2> "$OUT/learning.err"
    rc=$?
    # 0: finished; 143: stopped by SIGTERM at the budget, which the trainer answers with a checkpoint of every seed
    # and "stopped" in each seed's status.json (a SIGTERM before the trainer started leaves nothing: a timeout).
    stopped=$(grep -l '"state": "stopped"' "$OUT"/runs/*/*/seed_*/status.json 2> /dev/null | wc -l)
    case $rc in
        0) status=ok ;;
        143) if [ "$stopped" -eq "${#seeds[@]}" ]; then status=ok; else status=timeout; fi ;;
        137) status=timeout ;;
        *) status=failed ;;
    esac
fi
seconds=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
printf '{"part": "learning", "status": "%s", "rc": %s, "seconds": %s, "limit_s": %s}\n' \
    "$status" "$rc" "$seconds" "$learn_limit" > "$OUT/learning.status.json"
echo "check.sh: learning: $status (exit $rc) after ${seconds}s" >&2

# The seeds' logs, to commit under docs/results/; checkpoints, snapshots and TensorBoard files stay out.
if [ -d "$OUT/runs" ]; then
    (cd "$OUT/runs" && find . -type f \( -name config.json -o -name train.log -o -name eval.log -o -name status.json \) \
        | sort | tar -czf "$OUT/learning.tgz" -T -)
    # Only the logs stay under OUT: what comes back from the GPU machine must stay small.
    find "$OUT/runs" -type f ! \( -name config.json -o -name train.log -o -name eval.log -o -name status.json \) -delete
    find "$OUT/runs" -depth -type d -empty -delete
fi

"$PY" "$root/tools/gpu/summary.py" "$OUT" || {
    echo "check.sh: the summary failed; the parts' statuses:" >&2
    cat "$OUT"/*.status.json
    exit 1
}
for f in "$OUT"/*.status.json; do grep -q '"status": "ok"' "$f" || exit 1; done
