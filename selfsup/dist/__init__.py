"""The one place that talks to torch.distributed.

`collectives`: the process group and the collectives over its processes (the identity on one).
`microbatches`: the parts of the global batch when each process runs micro-batches
(train.accumulate). `sync_bn`: batch norm over the global batch.

A method's forward sees the whole batch through its views' `global_batch` (`GlobalBatch`):
`PROCESSES` by default, the step's `MicroBatches` during accumulation. The module functions
`gather`, `gather_nograd` and `all_reduce` are over processes only (`after_step` uses them on
what the whole step returned).
"""

from selfsup.dist.collectives import (
    PROCESSES,
    TIMEOUT,
    GlobalBatch,
    Processes,
    all_reduce,
    barrier,
    data_parallel,
    from_rank0,
    gather,
    gather_nograd,
    is_distributed,
    local_device,
    maximum,
    mean,
    process_group_from_env,
    process_rank,
    processes,
    shuffled,
)
from selfsup.dist.microbatches import MicroBatches
from selfsup.dist.sync_bn import SyncBatchNorm, sync_batch_norm

__all__ = [
    "PROCESSES",
    "TIMEOUT",
    "GlobalBatch",
    "MicroBatches",
    "Processes",
    "SyncBatchNorm",
    "all_reduce",
    "barrier",
    "data_parallel",
    "from_rank0",
    "gather",
    "gather_nograd",
    "is_distributed",
    "local_device",
    "maximum",
    "mean",
    "process_group_from_env",
    "process_rank",
    "processes",
    "shuffled",
    "sync_batch_norm",
]
