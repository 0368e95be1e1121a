"""VeRA under DistributedDataParallel: 2 CPU ranks (gloo) against a single-process run on the full batch, and
the recommended setting (vera_ext.distributed.ddp_ignore_projection) measured: DDP never broadcasts the shared
A/B, and all-reduces nothing but the lambdas. One 2-rank job (_ddp_worker.py) serves every test here."""

import pytest
import torch

from _dist_launch import run_ranks
from _dist_training import R, train, vera_mlp
from vera_ext import generate_projection
from vera_ext.distributed import projection_buffer_names


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks("_ddp_worker.py", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def reference():
    model = vera_mlp()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if "vera_lambda" in n}
    grads, lambdas = train(model, model)
    return initial, grads, lambdas


def test_projection_is_the_same_on_every_rank_by_construction(ranks):
    # Generated from projection_prng_key=0 on each rank independently (DDP was told not to sync it); the MLP's
    # targets are 10->20, 20->24, 24->20, so A is (R, 24) and B (24, R).
    A, B = generate_projection(R, 24, 24, prng_key=0)
    for rank in ranks:
        assert torch.equal(rank["A"], A) and torch.equal(rank["B"], B)


def test_lambda_grads_equal_single_process_full_batch(ranks, reference):
    _, grads, _ = reference
    assert len(grads) == 6 and min(g.abs().max().item() for g in grads.values()) > 1e-3  # all non-trivial
    for rank in ranks:
        assert rank["grads"].keys() == grads.keys()  # the lambdas, and nothing frozen
        for name, g in grads.items():
            assert (rank["grads"][name] - g).abs().max().item() <= 1e-5, name


def test_lambdas_after_optimizer_steps_equal_single_process(ranks, reference):
    initial, _, lambdas = reference
    for rank in ranks:
        for name, value in lambdas.items():
            assert not torch.allclose(value, initial[name]), name  # the steps moved every lambda
            assert (rank["lambdas"][name] - value).abs().max().item() <= 1e-5, name


def test_only_lambdas_are_all_reduced(ranks, reference):
    lambda_names = set(reference[1])
    for rank in ranks:
        assert len(rank["allreduces"]) >= 3  # at least one bucket per training step
        for bucket in rank["allreduces"]:
            assert set(bucket) <= lambda_names  # frozen base weights are never all-reduced
        assert set().union(*map(set, rank["allreduces"])) == lambda_names


def test_recommended_setting_keeps_projection_out_of_ddp_buffer_sync(ranks):
    every_alias = projection_buffer_names(vera_mlp())
    assert {"vera_projection.vera_A", "model.lin1.vera_projection.vera_B"} <= set(every_alias)
    for rank in ranks:
        assert sorted(rank["ignored"]) == sorted(every_alias)
        assert rank["synced_buffers"] == []  # the MLP has no other buffer
        assert rank["broadcasts"] == []  # three training steps, no buffer broadcast
        assert rank["A_after_training_equal"]


def test_recommended_setting_leaves_a_rank_local_projection_alone(ranks):
    # Rank 1 negated its A before a forward: DDP did not overwrite it with rank 0's.
    rank0, rank1 = ranks
    assert torch.equal(rank0["A_corrupted"], rank0["A"])
    assert torch.equal(rank1["A_corrupted"], -rank1["A"])


def test_default_ddp_broadcasts_projection_before_a_forward(ranks):
    # The contrast: with DDP's defaults, A/B (under whichever alias named_buffers() yields first) are broadcast
    # from rank 0 before each forward, so rank 1's negated A was replaced by rank 0's.
    rank0, rank1 = ranks
    for rank in ranks:
        assert rank["default_synced_buffers"] == projection_buffer_names(vera_mlp())[:2]
        assert rank["default_broadcasts"] == [2]  # one forward: one broadcast of A and B
    assert torch.equal(rank1["default_A_corrupted"], rank0["A"])
