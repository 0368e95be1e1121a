"""One rank of the DDP job (run by tests/distributed/test_ddp.py through _dist_launch.run_ranks).

Saves to <out_dir>/rank<r>.pt: the projection as generated, what DDP syncs, what it all-reduces, the first-step
gradients and final lambdas of a short training run, and what happens to a corrupted A with and without
vera_ext.distributed.ddp_ignore_projection.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist_launch import init_rank
from _dist_training import batch, train, vera_mlp
from vera_ext.distributed import ddp_ignore_projection


def record_allreduces(ddp: DDP, model) -> list[list[str]]:
    """Names of the parameters in every gradient bucket DDP all-reduces (the default all-reduce still runs)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    calls = []

    def hook(state, bucket):
        calls.append([name_of[id(p)] for p in bucket.parameters()])
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    return calls


def record_broadcasts(ddp: DDP) -> list[int]:
    """Number of tensors in every buffer broadcast DDP makes from now on."""
    calls = []
    original = ddp._distributed_broadcast_coalesced

    def spy(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return original(tensors, *args, **kwargs)

    ddp._distributed_broadcast_coalesced = spy
    return calls


def corrupt_then_forward(ddp: DDP, projection, rank: int) -> torch.Tensor:
    """Rank 1 negates its A, then every rank runs a forward; returns this rank's A afterwards."""
    if rank == 1:
        with torch.no_grad():
            projection.vera_A.neg_()
    with torch.no_grad():
        ddp(batch(0)[0])
    return projection.vera_A.clone()


def main(rank: int, out_dir: str) -> None:
    init_rank(rank)
    world = dist.get_world_size()
    result = {}

    model = vera_mlp()
    projection = model.vera_projection
    result["A"], result["B"] = projection.vera_A.clone(), projection.vera_B.clone()
    result["ignored"] = ddp_ignore_projection(model)
    ddp = DDP(model)
    result["synced_buffers"] = list(ddp.named_module_buffers)
    allreduces = record_allreduces(ddp, model)
    broadcasts = record_broadcasts(ddp)
    result["grads"], result["lambdas"] = train(ddp, model, rank=rank, world=world)
    result["allreduces"], result["broadcasts"] = allreduces, list(broadcasts)
    result["A_after_training_equal"] = torch.equal(projection.vera_A, result["A"])
    result["A_corrupted"] = corrupt_then_forward(ddp, projection, rank)

    # The same with DDP's defaults: the corrupted A is overwritten by rank 0's before the forward.
    default_model = vera_mlp()
    default_ddp = DDP(default_model)
    result["default_synced_buffers"] = list(default_ddp.named_module_buffers)
    default_broadcasts = record_broadcasts(default_ddp)
    result["default_A_corrupted"] = corrupt_then_forward(default_ddp, default_model.vera_projection, rank)
    result["default_broadcasts"] = list(default_broadcasts)

    torch.save(result, f"{out_dir}/rank{rank}.pt")
    # Both ranks done with every collective before either tears gloo down: a rank destroying its process group while
    # the other still communicates aborted once in CI ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
