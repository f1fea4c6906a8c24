"""The memory strategies of the residual-stack engine, one module each: ``full`` (autograd, optional activation
checkpointing), ``adjoint`` (rebuild by the rule's approximate inverse) and ``reversible`` (exact fixed-point
rebuild of the momentum rule); ``common`` holds what they share, ``replay`` the random/autocast/BatchNorm replay;
``planning`` picks the reversible stacks' ``stored_blocks`` for a memory budget by measuring the training step."""
