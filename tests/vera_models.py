"""Small models for the model-level tests: an MLP, a custom in/out-features layer, and tiny transformers models
built from their configs with random weights (no downloads). Each builder is seeded, so two calls give twins."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.lin1 = nn.Linear(20, 24, bias=bias)
        self.lin2 = nn.Linear(24, 20, bias=bias)
        self.head = nn.Linear(20, 3, bias=bias)

    def forward(self, x):
        x = torch.relu(self.lin0(x))
        x = torch.relu(self.lin1(x))
        x = torch.relu(self.lin2(x))
        return self.head(x)


class ScaledLinear(nn.Module):
    """Not an nn.Linear: a custom layer with in_features/out_features whose output the adapter is added to."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.scale * (x @ self.weight.T)


class CustomMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = ScaledLinear(6, 12)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


class Blocks(nn.Module):
    """body.layers.<i>.proj and body.h.<i>.proj, for layers_to_transform / layers_pattern."""

    def __init__(self, n: int = 3, width: int = 8):
        super().__init__()
        self.body = nn.ModuleDict(
            {
                "layers": nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(width, width)}) for _ in range(n)),
                "h": nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(width, width)}) for _ in range(n)),
            }
        )

    def forward(self, x):
        for block in list(self.body["layers"]) + list(self.body["h"]):
            x = torch.tanh(block["proj"](x))
        return x


def mlp(seed: int = 0, dtype=torch.float32, bias: bool = True) -> MLP:
    torch.manual_seed(seed)
    return MLP(bias).to(dtype)


def custom_mlp(seed: int = 0) -> CustomMLP:
    torch.manual_seed(seed)
    return CustomMLP()


def tiny_llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype).eval()


def token_ids(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def peft_model(model, **config_kwargs):
    """PEFT 0.21.2's VeRA on ``model`` (the reference)."""
    from peft import VeraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, VeraConfig(**config_kwargs))


def ours(model, adapter_name="default", **config_kwargs):
    from vera_ext.config import VeraConfig
    from vera_ext.model import get_vera_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_vera_model(model, VeraConfig(**config_kwargs), adapter_name)


def randomize_lambdas(model, seed: int = 3) -> None:
    """Non-trivial adapter weights (init_weights=True starts at lambda_b = 0, where the adapter does nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "vera_lambda" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def snapshot(model: nn.Module) -> dict:
    """Everything a refused call must leave as it was: structure, tensors, trainability."""
    return {
        "repr": repr(model),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["repr"] == before["repr"]
    assert after["grad"] == before["grad"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k


def twins(builder, *args, **kwargs):
    a = builder(*args, **kwargs)
    return a, copy.deepcopy(a)
