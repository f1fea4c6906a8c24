#!/usr/bin/env bash
# Several nodes, one process per GPU, torchrun's c10d rendezvous: run this same command on every node, with the
# same NNODES, RDZV_ENDPOINT (host:port of one of the nodes, reachable from all) and JOB_ID:
#   NNODES=4 RDZV_ENDPOINT=node001:29400 JOB_ID=refit152 \
#     bash examples/launch/torchrun_multi_node.sh imagenet_refit_momentum_resnet152 --data.init_args.root /data/imagenet
# Lightning takes the ranks from torchrun's environment (TorchElasticEnvironment): --trainer.num_nodes must equal
# --nnodes and --trainer.devices --nproc-per-node. The global batch is NNODES x GPUS_PER_NODE x the recipe's
# per-process batch_size (see docs/scaling.md for the learning rate).
set -euo pipefail

NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_ENDPOINT=${RDZV_ENDPOINT:?give RDZV_ENDPOINT=host:port of one node, the same on every node}
JOB_ID=${JOB_ID:-zoo}
RECIPE=${1:-imagenet_refit_momentum_resnet152}
if [ $# -gt 0 ]; then shift; fi

torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$JOB_ID" \
    -m zoo.cli fit --config "$RECIPE" \
    --trainer.accelerator gpu --trainer.devices "$GPUS_PER_NODE" --trainer.num_nodes "$NNODES" \
    --trainer.strategy ddp \
    "$@"
