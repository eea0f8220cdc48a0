#!/usr/bin/env bash
# record_slurm.sh RULE RECORDS_DIR -- write what SLURM gave this job to
# RECORDS_DIR/RULE/$SLURM_JOB_ID.txt (and to stdout, i.e. the rule's log).
set -euo pipefail
rule=$1
dir=$2/$rule
mkdir -p "$dir"
jobid=${SLURM_JOB_ID:-local-$$}
tmp=$dir/.$jobid.tmp
{
    echo "RULE=$rule"
    echo "HOST=$(hostname -s)"
    echo "START_EPOCH_S=$(date +%s.%N)"
    for v in SLURM_JOB_ID SLURM_JOB_PARTITION SLURM_MEM_PER_NODE SLURM_MEM_PER_CPU \
        SLURM_CPUS_ON_NODE SLURM_CPUS_PER_TASK SLURM_CPUS_PER_GPU SLURM_GPUS \
        SLURM_JOB_GPUS SLURM_GPUS_ON_NODE SLURM_JOB_NAME SLURM_RESTART_COUNT; do
        echo "$v=${!v-}"
    done
    echo "--- scontrol show job"
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        scontrol show job "$SLURM_JOB_ID" || echo "scontrol failed"
    fi
} >"$tmp"
mv "$tmp" "$dir/$jobid.txt"
cat "$dir/$jobid.txt"
