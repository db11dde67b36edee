#!/usr/bin/env bash
# The video-object results in this folder, on the CPU of the machine at hand (2 cores
# shared with other work). Every system trains at one common budget, BUDGET below (the
# config's own defaults unless overridden here), so the runs are comparable (frame_long
# alone has a larger one, to see what budget buys): J on the validation and test videos of
# held-out digits, 64x64 canvas, 24 frames, K = 8.
# Each run's config.json, metrics.jsonl, starts.jsonl, results.json and final checkpoint
# (runs trained before this copy was made have none) are copied here;
# summary.md is then written from them (rvm.analysis.video_objects.write_summary), with
# the budget read back from the runs' config.json. Wall times go to times.txt.
# Rerunning resumes unfinished runs and skips finished ones; RUNS="frame_long" trains only
# the runs named (a run recorded here without its workdir is kept as it is). Logs:
# $WORKDIRS/NAME.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
WORKDIRS=${WORKDIRS:-workdirs/video_objects_cpu_v2}
OUT=results/video_objects_cpu
CONFIG=experiments/configs/video_objects.py
MACHINE=${MACHINE:-"$(lscpu | grep 'Model name' | sed 's/Model name: *//'), 2 cores shared with other work"}
BUDGET=()
RUNS=${RUNS:-"frame dual small stale pc pc_ignore_0.03 pc_ignore_0.045 pc_ignore_0.08 pc_ignore_0.1
  pc_ignore_0.12 resrec_gru dual_carry frame_long frame_match frame_match_long propagate
  propagate_long"}
mkdir -p "$WORKDIRS"

train() {  # NAME VARIANT [--config.FIELD=VALUE ...]
  local name=$1 variant=$2 start=$SECONDS
  shift 2
  [[ " ${RUNS//$'\n'/ } " == *" $name "* ]] || return 0
  if [[ -f "$OUT/$name/results.json" && ! -d "$WORKDIRS/$name" ]]; then
    echo "$name: the committed run"
    return 0
  fi
  local trained=0
  if [[ ! -f "$WORKDIRS/$name/results.json" ]]; then
    nice -n 5 python -m experiments.train --config="$CONFIG:$variant" ${BUDGET[@]+"${BUDGET[@]}"} "$@" \
      --workdir="$WORKDIRS/$name" >>"$WORKDIRS/$name.log" 2>&1
    trained=1
  fi
  mkdir -p "$OUT/$name"
  cp "$WORKDIRS/$name"/{config.json,metrics.jsonl,starts.jsonl,results.json} "$OUT/$name/"
  local last  # the final checkpoint, so that the run can be evaluated again
  last=$(ls "$WORKDIRS/$name/checkpoints" | sort -n | tail -1)
  rm -rf "$OUT/$name/checkpoints"
  mkdir -p "$OUT/$name/checkpoints"
  cp -r "$WORKDIRS/$name/checkpoints/$last" "$OUT/$name/checkpoints/"
  if ((trained)); then  # the wall time of a training that ran now (a resumed one: its last part)
    echo "$name: $((SECONDS - start)) s" | tee -a "$OUT/times.txt"
  else
    echo "$name: recorded before"
  fi
}

train frame frame
train dual dual
train small small
train stale stale
train pc pc
# pc with the ignore threshold set (in training and evaluation alike): a frame whose mean
# absolute change from the last frame processed (pixels / 255) is below it reuses
# everything. The thresholds go from skipping almost no frame to skipping most of them
# (each run's frames_ignored); the one reported is chosen on validation J.
for t in 0.03 0.045 0.08 0.1 0.12; do
  train "pc_ignore_$t" pc --config.model.ignore_threshold="$t"
done
train resrec_gru resrec_gru
train dual_carry dual_carry
# The reference system at a larger budget, to see how far J moves with training alone:
# 2,048 training videos (four times the common budget's), 8 epochs (2,048 Adam steps of 8
# videos against 192), the learning rate dropped at 80% as in every run.
train frame_long frame --config.data.num_train=2048 --config.num_epochs=8
# The reference system at the common budget with a matching head (model.match): each site
# of every frame compared with frame 0's target, wherever the target has moved.
train frame_match frame --config.model.match=True
# ... and with frame_long's budget.
train frame_match_long frame --config.model.match=True --config.data.num_train=2048 \
  --config.num_epochs=8
# Mask propagation: the big network frame by frame, also given the mask it predicted for
# the previous frame, trained through its own predictions; at the common budget and at
# frame_long's.
train propagate propagate
train propagate_long propagate --config.data.num_train=2048 --config.num_epochs=8
# Runs whose results.json predates J by distractor class, evaluated again from their
# checkpoint (evaluated.json); then the summary.
python -c "from rvm.analysis.video_objects import evaluate_where_missing as e; print(e('$OUT'))"
python -c "from rvm.analysis.video_objects import write_summary; write_summary('$OUT', '$MACHINE')"
