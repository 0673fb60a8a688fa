#!/usr/bin/env bash
# Folders to shards on a SLURM cluster: one array task per part, then one job that finishes the run.
#
#   bash examples/slurm/make_shards_array.sh INPUT OUTPUT_DIR PARTS [make_shards options...]
#   bash examples/slurm/make_shards_array.sh /data/photos /shared/shards 16 --max-image-size 256
#
# Submits three jobs (INPUT and OUTPUT_DIR on a file system every node sees):
#   1. list INPUT once into OUTPUT_DIR/_manifest.jsonl.gz: one walk of the file system, not one per part;
#   2. an array of PARTS tasks; task I runs `--part I/PARTS`: every PARTS-th shard, with the local pool of
#      its node (CPUS processes);
#   3. when every task has ended, whether or not it succeeded (afterany), `--resume`: it writes what a failed
#      or killed task left unfinished, then stats.json and sizes.json.
# Any executor writes the same bytes for a shard, so the result is that of one plain run. Submitting the same
# command again continues where it stopped. To start over on an old OUTPUT_DIR, clear it first:
#   python -m data_tools.make_shards INPUT OUTPUT_DIR [options] --overwrite --manifest-only
# Environment: CPUS (per task, default 8), PY (the python with mmcontrast installed, default python),
# SBATCH_ARGS (more sbatch options for every job, e.g. "--partition=cpu --time=04:00:00").
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 INPUT OUTPUT_DIR PARTS [make_shards options...]" >&2
    exit 2
fi
input=$1 output=$2 parts=$3
shift 3
cpus=${CPUS:-8}
read -r -a sbatch_args <<< "${SBATCH_ARGS:-}"
# the same INPUT, OUTPUT_DIR and options for every step, quoted for --wrap
convert="$(printf '%q ' "${PY:-python}" -m data_tools.make_shards "$input" "$output" "$@")"

listing=$(sbatch --parsable "${sbatch_args[@]}" --job-name=shards-list --cpus-per-task=1 \
    --wrap "$convert --resume --manifest-only")
array=$(sbatch --parsable "${sbatch_args[@]}" --job-name=shards-part --dependency="afterok:$listing" \
    --array="0-$((parts - 1))" --cpus-per-task="$cpus" \
    --wrap "$convert --part \$SLURM_ARRAY_TASK_ID/$parts --workers $cpus")
finish=$(sbatch --parsable "${sbatch_args[@]}" --job-name=shards-finish --dependency="afterany:$array" \
    --cpus-per-task="$cpus" --wrap "$convert --resume --workers $cpus")
echo "submitted: listing $listing, parts $array (array of $parts), finish $finish"
