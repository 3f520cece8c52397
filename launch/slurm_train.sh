#!/usr/bin/env bash
# Multi-GPU / multi-host training under SLURM: one process per node, all GPUs of the node visible to it;
# jax.distributed.initialize() (--multihost) reads the SLURM environment to find its peers.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_train.sh configs/dalora_dino.py workdirs/dalora_dino [--config.x=y ...]
#
#SBATCH --job-name=adaptface
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@120
set -euo pipefail
config=${1:?usage: slurm_train.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: slurm_train.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "${SLURM_SUBMIT_DIR:-.}"
# --signal=TERM@120 gives the run two minutes to checkpoint before the time limit; resubmitting resumes.
srun python -m adaptface_jax.main --multihost --config "$config" --workdir "$workdir" "$@"
