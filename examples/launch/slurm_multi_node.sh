#!/usr/bin/env bash
#SBATCH --job-name=zoo-fit
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# A multi-node run under SLURM: srun starts one task per GPU on every node and Lightning takes the ranks, the
# master address and port from SLURM's environment (SLURMEnvironment); --trainer.num_nodes and --trainer.devices
# must equal --nodes and --ntasks-per-node, read here from the allocation. Submit from the clone, with zoo
# installed in the environment the job inherits:
#   sbatch examples/launch/slurm_multi_node.sh imagenet_refit_momentum_resnet152 --data.init_args.root /data/imagenet
#   sbatch --nodes=2 examples/launch/slurm_multi_node.sh [recipe] [more zoo fit options]
# The global batch is nodes x tasks per node x the recipe's per-process batch_size (docs/scaling.md).
set -euo pipefail

RECIPE=${1:-imagenet_refit_momentum_resnet152}
if [ $# -gt 0 ]; then shift; fi
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

srun --kill-on-bad-exit=1 \
    zoo fit --config "$RECIPE" \
    --trainer.accelerator gpu --trainer.num_nodes "$SLURM_JOB_NUM_NODES" \
    --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.strategy ddp \
    "$@"
