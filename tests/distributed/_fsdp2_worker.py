"""One rank of the FSDP2 job (run by tests/distributed/test_fsdp2.py through _dist_launch.run_ranks).

Four ways of sharding the same model, each saved under its name in <out_dir>/rank<r>.pt:
  fp32          fully_shard_vera_layers + fully_shard(root), fp32 throughout: trains 3 steps; rank 0 then saves
                the adapter to <out_dir>/adapter under fsdp_unsharded.
  bf16_policy   the same under MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): trains 3 steps.
  bf16_naive    fully_shard(root, bf16 policy) alone: one forward, to see what FSDP2 does to the lambdas.
  bf16_storage  base weights stored bf16, lambdas fp32, fully_shard(root) with the default policy: 3 steps.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from _dist_launch import init_rank
from _dist_training import batch, train, vera_mlp
from vera_ext.distributed import fsdp_unsharded, fully_shard_vera_layers

BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def watch_forward(model) -> dict:
    """{layer path: what the layer saw in its forward}: the lambdas' type and dtype (after FSDP2's all-gather,
    whose hook runs first), the input's and output's dtype."""
    seen = {}
    for path, layer in model.vera_layers().items():

        def before(module, args, path=path):
            lambdas = [module.vera_lambda_d["default"], module.vera_lambda_b["default"]]
            seen[path] = {
                "lambda_dtypes": sorted({str(t.dtype) for t in lambdas}),
                "lambda_is_dtensor": any(isinstance(t, DTensor) for t in lambdas),
                "x_dtype": str(args[0].dtype),
            }

        def after(module, args, output, path=path):
            seen[path]["out_dtype"] = str(output.dtype)

        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)
    return seen


def sharded_state(model) -> dict:
    """How every lambda and buffer is held between steps."""
    lambdas = {n: p for n, p in model.named_parameters() if "vera_lambda" in n}
    return {
        "lambda_types": sorted({type(p).__name__ for p in lambdas.values()}),
        "lambda_placements": sorted({str(p.placements) for p in lambdas.values() if isinstance(p, DTensor)}),
        "lambda_dtypes": sorted({str(p.dtype) for p in lambdas.values()}),
        "buffers": {n: (type(b).__name__, tuple(b.shape), b.clone()) for n, b in model.named_buffers()},
    }


def run_training(model, dtype) -> dict:
    seen = watch_forward(model)
    grads, lambdas = train(model, model, rank=dist.get_rank(), world=dist.get_world_size(), dtype=dtype)
    return {"grads": grads, "lambdas": lambdas, "forward": seen, **sharded_state(model)}


def main(rank: int, out_dir: str) -> None:
    init_rank(rank)
    result = {}

    model = vera_mlp()
    fully_shard_vera_layers(model)
    fully_shard(model)
    result["fp32"] = run_training(model, torch.float32)
    with fsdp_unsharded(model):
        if rank == 0:
            model.save_pretrained(f"{out_dir}/adapter")
    result["fp32"]["still_sharded_after_save"] = all(
        isinstance(p, DTensor) for n, p in model.named_parameters() if "vera_lambda" in n
    )
    dist.barrier()

    model = vera_mlp()
    fully_shard_vera_layers(model, mp_policy=BF16)
    fully_shard(model, mp_policy=BF16)
    result["bf16_policy"] = run_training(model, torch.bfloat16)

    model = vera_mlp()
    fully_shard(model, mp_policy=BF16)
    seen = watch_forward(model)
    model(batch(0)[0])
    result["bf16_naive"] = {"forward": seen}

    model = vera_mlp(torch.bfloat16)
    fully_shard(model)
    result["bf16_storage"] = run_training(model, torch.bfloat16)

    torch.save(result, f"{out_dir}/rank{rank}.pt")
    # Both ranks done with every collective before either tears gloo down: a rank destroying its process group while
    # the other still communicates aborted once in CI ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
