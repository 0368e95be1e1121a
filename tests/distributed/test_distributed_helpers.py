"""vera_ext.distributed's helpers in one process: which names they pick, and their errors (the 2-rank behaviour
is in test_ddp.py and test_fsdp2.py)."""

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.nn.parallel import DistributedDataParallel

from _dist_training import vera_mlp
from vera_ext import VeraLinear
from vera_ext.distributed import (
    ddp_ignore_projection,
    fsdp_unsharded,
    fully_shard_vera_layers,
    projection_buffer_names,
)


def test_projection_buffer_names_are_every_alias_of_a_and_b():
    model = vera_mlp()
    A, B = model.vera_projection.vera_A, model.vera_projection.vera_B
    # Every name under which torch itself can reach A or B, and nothing else (base weights, lambdas).
    aliases = [n for n, b in model.named_buffers(remove_duplicate=False) if b is A or b is B]
    assert len(aliases) == 2 * 4  # the VeraModel's projection and the one each of 3 layers holds: one module
    assert sorted(projection_buffer_names(model)) == sorted(aliases)


def test_projection_buffer_names_of_a_lone_layer():
    layer = VeraLinear(nn.Linear(6, 5), r=4)
    assert projection_buffer_names(layer) == ["vera_projection.vera_A", "vera_projection.vera_B"]
    assert projection_buffer_names(layer.vera_projection) == ["vera_A", "vera_B"]


def test_ddp_ignore_projection_marks_names_and_keeps_an_existing_ignore_list():
    model = vera_mlp()
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["model.head.weight"])
    names = ddp_ignore_projection(model)
    assert names == projection_buffer_names(model)
    assert sorted(model._ddp_params_and_buffers_to_ignore) == sorted(["model.head.weight", *names])
    assert getattr(model.vera_projection.vera_A, "_ddp_ignored", False)
    assert not hasattr(model.model.lin0.base_layer.weight, "_ddp_ignored")  # frozen weights are not touched
    ddp_ignore_projection(model)  # twice: no duplicates
    assert len(model._ddp_params_and_buffers_to_ignore) == 1 + len(names)


def test_ddp_ignore_projection_errors():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        ddp_ignore_projection("model")
    with pytest.raises(ValueError, match="holds no VeraProjection"):
        ddp_ignore_projection(nn.Linear(3, 3))
    wrapped = DistributedDataParallel.__new__(DistributedDataParallel)  # an instance, without a process group
    with pytest.raises(TypeError, match="before DistributedDataParallel"):
        ddp_ignore_projection(wrapped)


def test_fully_shard_vera_layers_errors():
    with pytest.raises(TypeError, match="mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy"):
        fully_shard_vera_layers(vera_mlp(), mp_policy=torch.bfloat16)
    with pytest.raises(ValueError, match="holds no VeraLinear"):
        fully_shard_vera_layers(nn.Sequential(nn.Linear(3, 3)), mp_policy=MixedPrecisionPolicy())


def test_fsdp_unsharded_needs_a_sharded_module():
    with pytest.raises(ValueError, match="has no FSDP2 group"):
        with fsdp_unsharded(vera_mlp()):
            pass
