#!/usr/bin/env bash
# One node, one process per GPU, started by torchrun (Lightning reads torchrun's environment and starts nothing
# itself; `zoo fit --trainer.devices N` alone, without torchrun, does the same on one node).
#   bash examples/launch/torchrun_single_node.sh [recipe] [more zoo fit options]
#   GPUS=4 bash examples/launch/torchrun_single_node.sh cifar10_sinkformer_vit_small --data.init_args.download true
# --trainer.devices must equal --nproc-per-node. The recipe's data.init_args.batch_size is per process: the global
# batch is GPUS times it (see docs/scaling.md for the learning rate).
set -euo pipefail

GPUS=${GPUS:-8}
RECIPE=${1:-cifar10_depth_scaled_resnet101}
if [ $# -gt 0 ]; then shift; fi

torchrun --standalone --nnodes=1 --nproc-per-node="$GPUS" \
    -m zoo.cli fit --config "$RECIPE" \
    --trainer.accelerator gpu --trainer.devices "$GPUS" --trainer.num_nodes 1 --trainer.strategy ddp \
    "$@"
