"""VeRA under FSDP2 (torch.distributed.fsdp.fully_shard) on 2 CPU ranks with gloo, against single-process runs.

fp32: lambda gradients and values equal a single-process full-batch run within 1e-5. bf16 (a bf16
MixedPrecisionPolicy, or a base stored in bf16): the lambdas stay fp32 in forward and backward, and the 2-rank
result is within 2x the error of the same single-process bf16 computation, both measured against an fp32 run on
the same (bf16-rounded) weights and inputs. One 2-rank job (_fsdp2_worker.py) serves every test here.
"""

import pytest
import torch
from torch import nn

from _dist_launch import run_ranks
from _dist_training import R, train, vera_mlp
from vera_models import mlp
from vera_ext import VeraModel, generate_projection

BF16_CASES = {"bf16_policy": torch.float32, "bf16_storage": torch.bfloat16}  # case -> the dtype the model is stored in


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp2")


@pytest.fixture(scope="module")
def ranks(out_dir):
    return run_ranks("_fsdp2_worker.py", out_dir)


def _frozen(model) -> list[nn.Module]:
    return [model.model.head] + [layer.base_layer for layer in model.vera_layers().values()]


class _UpcastInputs(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.float())


def _single_process_bf16(case: str):
    """The case's computation in one process: frozen weights in bf16, lambdas fp32, bf16 inputs. Under
    fully_shard_vera_layers each base layer is an FSDP group, whose forward hook makes VeraLinear take its
    unfused path; a no-op hook does the same here so both run the same ops. The batch runs in the ranks' two halves
    (shares=2): the forward path depends on the row count (the fused small-batch pass at 4 rows), and this ReLU
    net is sensitive enough that two paths' different roundings can flip a unit near zero after a step, which
    would be a difference of paths, not of FSDP."""
    model = vera_mlp(BF16_CASES[case])
    for module in _frozen(model):
        module.to(torch.bfloat16)
        if case == "bf16_policy":
            module.register_forward_pre_hook(lambda *args: None)
    return train(model, model, dtype=torch.bfloat16, shares=2)


def _upcast_reference(case: str):
    """The same weights and inputs, rounded to bf16 as the case sees them, computed in fp32."""
    model = vera_mlp(BF16_CASES[case])
    for module in _frozen(model):
        module.to(torch.bfloat16).float()
    return train(_UpcastInputs(model), model, dtype=torch.bfloat16)


def _relative_error(got: dict, want: dict) -> float:
    return max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)


def test_lambdas_are_sharded_and_projection_buffers_are_not(ranks):
    A, B = generate_projection(R, 24, 24, prng_key=0)
    for rank in ranks:
        for case in ("fp32", "bf16_policy", "bf16_storage"):
            state = rank[case]
            assert state["lambda_types"] == ["DTensor"] and state["lambda_placements"] == ["(Shard(dim=0),)"]
            assert state["lambda_dtypes"] == ["torch.float32"]  # the sharded (optimizer's) copy
            # A/B: plain tensors, whole on every rank (FSDP2 shards parameters only).
            kinds = {name: kind_shape for name, (*kind_shape, _) in state["buffers"].items()}
            assert kinds == {
                "model.lin0.vera_projection.vera_A": ["Tensor", (R, 24)],
                "model.lin0.vera_projection.vera_B": ["Tensor", (24, R)],
            }
        for case in ("fp32", "bf16_policy"):  # fp32 models: the key's draw itself
            buffers = rank[case]["buffers"]
            assert torch.equal(buffers["model.lin0.vera_projection.vera_A"][2], A)
            assert torch.equal(buffers["model.lin0.vera_projection.vera_B"][2], B)


def test_fp32_lambda_grads_and_steps_equal_single_process(ranks):
    model = vera_mlp()
    grads, lambdas = train(model, model)
    assert len(grads) == 6 and min(g.abs().max().item() for g in grads.values()) > 1e-3
    for rank in ranks:
        assert rank["fp32"]["grads"].keys() == grads.keys()
        for name in grads:
            assert (rank["fp32"]["grads"][name] - grads[name]).abs().max().item() <= 1e-5, name
            assert (rank["fp32"]["lambdas"][name] - lambdas[name]).abs().max().item() <= 1e-5, name


def test_save_pretrained_of_a_sharded_model_under_fsdp_unsharded(ranks, out_dir):
    # Written by rank 0 after the 3 fp32 steps; a plain single-process model loads it and holds the lambdas of
    # the single-process run.
    model = vera_mlp()
    _, lambdas = train(model, model)
    loaded = VeraModel.from_pretrained(mlp(0), out_dir / "adapter")
    got = {n: p for n, p in loaded.named_parameters() if "vera_lambda" in n}
    assert got.keys() == lambdas.keys()
    for name, value in lambdas.items():
        assert (got[name] - value).abs().max().item() <= 1e-5, name
    assert all(rank["fp32"]["still_sharded_after_save"] for rank in ranks)


@pytest.mark.parametrize("case", sorted(BF16_CASES))
def test_bf16_lambdas_stay_fp32_in_forward_and_backward(ranks, case):
    for rank in ranks:
        for path, seen in rank[case]["forward"].items():
            assert seen == {
                "lambda_dtypes": ["torch.float32"],
                "lambda_is_dtensor": False,
                "x_dtype": "torch.bfloat16",
                "out_dtype": "torch.bfloat16",
            }, path
        assert {str(g.dtype) for g in rank[case]["grads"].values()} == {"torch.float32"}


def test_a_bf16_policy_on_the_root_alone_casts_the_lambdas(ranks):
    # Why fully_shard_vera_layers exists: FSDP2 casts every parameter of a group to param_dtype.
    for rank in ranks:
        for path, seen in rank["bf16_naive"]["forward"].items():
            assert seen["lambda_dtypes"] == ["torch.bfloat16"], path


@pytest.mark.parametrize("case", sorted(BF16_CASES))
def test_bf16_lambda_grads_and_steps_match_single_process(ranks, case):
    ref_grads, ref_lambdas = _upcast_reference(case)
    one_grads, one_lambdas = _single_process_bf16(case)
    grad_budget = 2 * _relative_error(one_grads, ref_grads)
    lambda_budget = 2 * _relative_error(one_lambdas, ref_lambdas)
    for rank in ranks:
        assert _relative_error(rank[case]["grads"], ref_grads) <= grad_budget
        assert _relative_error(rank[case]["lambdas"], ref_lambdas) <= lambda_budget
