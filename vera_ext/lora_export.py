"""Export a VeRA adapter as a PEFT LoRA adapter directory (docs/DESIGN.md §9).

A VeRA layer's delta is already a rank-r product, ``dW = diag(lambda_b) B_l diag(lambda_d) A_l``, so the LoRA with

    lora_B = diag(lambda_b) B_l   (out, r)      lora_A = diag(lambda_d) A_l   (r, in)      lora_alpha = r (scale 1)

computes exactly the same function; no serving engine runs VeRA, all run LoRA. ``rank=k < r`` writes the best
rank-k approximation of each dW (Eckart-Young) from a QR of each thin factor and an SVD of the small core, never
forming the (out, in) product: lora_B = Q_B R_B, lora_A^T = Q_A R_A, R_B R_A^T = U S V^T, then
``lora_B = Q_B U_k sqrt(S_k)``, ``lora_A = sqrt(S_k) V_k^T Q_A^T`` (the singular values split evenly between the
two factors). The factors are computed in float64 on the CPU whatever the model's dtype and device, and written in
``dtype`` (float32 by default).

    vera_ext.export_lora(vera_model, "default", "out/lora")             # exact, rank r
    vera_ext.export_lora(vera_model, "default", "out/lora16", rank=16)  # best rank-16 approximation per layer

The directory is PEFT 0.21.2's LoRA format: ``adapter_config.json`` (``peft_type: LORA``) and
``adapter_model.safetensors`` with ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` and the
adapter's ``modules_to_save`` copies under ``base_model.model.<module path>.<key>`` (what ``PeftModel.save_pretrained``
writes), loadable with ``PeftModel.from_pretrained(base, out_dir)`` on the *unmerged* base model.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from .atomic_files import StagedFiles, abandon, missing_dirs
from .checkpoint import PREFIX, WEIGHTS_NAME, config_to_write
from .config import CONFIG_NAME

__all__ = ["export_lora", "lora_factors", "lora_state_dict", "best_rank_k"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def best_rank_k(lora_B: Tensor, lora_A: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(B_k (out, k), A_k (k, in)) with ``B_k @ A_k`` the best rank-k approximation of ``lora_B @ lora_A`` in the
    spectral and Frobenius norms (Eckart-Young), from QR factors of the two thin matrices and an SVD of the
    (<= r) x (<= r) core; the (out, in) product is never formed. Computed in float64 on the CPU. When the product
    has fewer than k singular values (out or in below k) the factors are padded with zeros to k."""
    B = lora_B.detach().to("cpu", torch.float64)
    At = lora_A.detach().to("cpu", torch.float64).T
    Q_B, R_B = torch.linalg.qr(B)  # (out, p), (p, r), p = min(out, r)
    Q_A, R_A = torch.linalg.qr(At)  # (in, q), (q, r), q = min(in, r)
    U, S, Vh = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)  # (p, q) core
    kept = min(k, S.numel())
    root = S[:kept].sqrt()
    B_k = torch.zeros(B.shape[0], k, dtype=torch.float64)
    A_k = torch.zeros(k, At.shape[0], dtype=torch.float64)
    B_k[:, :kept] = (Q_B @ U[:, :kept]) * root
    A_k[:kept] = root[:, None] * (Vh[:kept] @ Q_A.T)
    return B_k, A_k


def lora_factors(vera_model, adapter_name: str = "default", rank: Optional[int] = None) -> dict[str, tuple]:
    """{module path: (lora_A (k, in), lora_B (out, k))} in float64 on the CPU: the exact factors (k = r) when
    ``rank`` is None or >= r, else the best rank-``rank`` approximation of each layer's delta (:func:`best_rank_k`).
    Checks ``vera_model``, ``adapter_name`` and ``rank`` as :func:`export_lora` does."""
    _check_model_and_adapter(vera_model, adapter_name)
    _check_rank(rank)
    projection = vera_model.vera_projection
    # (once for all layers: each takes a slice; per layer, a model on a GPU would copy A and B to the host each time)
    A_all = projection.vera_A.detach().to("cpu", torch.float64)
    B_all = projection.vera_B.detach().to("cpu", torch.float64)
    out: dict[str, tuple] = {}
    for path, layer in vera_model.vera_layers().items():
        if adapter_name not in layer.vera_lambda_d:
            continue
        r = layer.r[adapter_name]
        lambda_d = layer.vera_lambda_d.live(adapter_name).detach().to("cpu", torch.float64)
        lambda_b = layer.vera_lambda_b.live(adapter_name).detach().to("cpu", torch.float64)
        A = A_all[:r, : layer.in_features]
        B = B_all[: layer.out_features, :r]
        lora_A, lora_B = lambda_d[:, None] * A, lambda_b[:, None] * B
        if rank is not None and rank < r:
            lora_B, lora_A = best_rank_k(lora_B, lora_A, rank)
        out[path] = (lora_A, lora_B)
    if not out:
        raise ValueError(f"adapter_name {adapter_name!r}: no VeRA layer of this model holds that adapter")
    return out


def lora_state_dict(
    vera_model,
    adapter_name: str = "default",
    rank: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json's dict, {key: tensor on the CPU}): what :func:`export_lora` writes, in memory."""
    _check_model_and_adapter(vera_model, adapter_name)
    _check_rank(rank)
    _check_dtype(dtype)
    config = vera_model.peft_config[adapter_name]
    if config.bias != "none":
        raise ValueError(
            f"adapter_name {adapter_name!r}: its config trains biases (bias={config.bias!r}); a LoRA export holds "
            "the adapter's delta weights only (PEFT's convert_to_lora refuses this too). Export an adapter with "
            "bias='none'"
        )
    if any(adapter_name in layer.merged_adapters for layer in vera_model.vera_layers().values()):
        warnings.warn(
            f"adapter {adapter_name!r} is merged into this model's base weights; the exported LoRA is the adapter "
            "itself, to be loaded onto the unmerged base model (loading it onto these merged weights would add the "
            "delta twice)"
        )
    factors = lora_factors(vera_model, adapter_name, rank)
    tensors: dict[str, Tensor] = {}
    for path, (lora_A, lora_B) in factors.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = lora_A.to(dtype).contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = lora_B.to(dtype).contiguous()
    saved_modules = []
    for path, wrapper in vera_model.modules_to_save_wrappers().items():
        if adapter_name in wrapper.modules_to_save:
            saved_modules.append(path)
            for key, value in wrapper.modules_to_save[adapter_name].state_dict().items():
                # cloned: safetensors refuses aliased tensors (tied weights); the module's own dtype is kept
                tensors[f"{PREFIX}{path}.{key}"] = value.detach().to("cpu").clone().contiguous()
    ranks = {a.shape[0] for a, _ in factors.values()}
    (k,) = ranks  # one adapter has one r, and every truncated layer gets exactly `rank`
    written = config_to_write(vera_model, adapter_name)  # base_model_name_or_path / auto_mapping as save writes
    lora_config = {
        "peft_type": "LORA",
        "task_type": written.task_type,
        "base_model_name_or_path": written.base_model_name_or_path,
        "revision": written.revision,
        "auto_mapping": written.auto_mapping,
        "inference_mode": True,
        "r": k,
        "lora_alpha": k,  # scaling lora_alpha / r = 1: the factors carry the whole delta
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(factors),  # the adapted modules by their full paths
        "lora_dropout": config.vera_dropout,
        "fan_in_fan_out": config.fan_in_fan_out,
        "bias": "none",
        "modules_to_save": config.modules_to_save if saved_modules else None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return lora_config, tensors


def export_lora(
    vera_model,
    adapter_name: str,
    out_dir: Union[str, os.PathLike],
    rank: Optional[int] = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Write adapter ``adapter_name`` of ``vera_model`` (a :class:`vera_ext.VeraModel`) into ``out_dir`` as a PEFT
    LoRA adapter: exact at rank r (``rank`` None or >= r), the best rank-``rank`` approximation of every layer's
    delta below it. The factors are written in ``dtype`` (float32 by default; modules_to_save in their own dtype).
    ``out_dir`` is created when missing; an existing LoRA export there is replaced, any other PEFT adapter there is
    refused. Nothing is written on a refused call, and a failed write leaves ``out_dir`` as it was. A merged
    adapter exports too (with a warning): the LoRA is relative to the unmerged base. Adapters that train biases
    (``bias`` other than "none") are refused, as PEFT's ``convert_to_lora`` refuses them. Returns the config
    written."""
    lora_config, tensors = lora_state_dict(vera_model, adapter_name, rank, dtype)
    directory = _check_out_dir(out_dir)
    from safetensors.torch import save_file

    staged = StagedFiles()
    created = missing_dirs(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        staged.write(
            os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
        )
        staged.write_text(os.path.join(directory, CONFIG_NAME), json.dumps(lora_config, indent=2, sort_keys=True))
        staged.commit()
    except BaseException:
        abandon(staged, created)
        raise
    return lora_config


# ---------------------------------------------------------------------------------------------------- checks


def _check_model_and_adapter(vera_model, adapter_name) -> None:
    from .model import VeraModel

    if not isinstance(vera_model, VeraModel):
        raise TypeError(
            f"vera_model must be a vera_ext.VeraModel (from get_vera_model or VeraModel.from_pretrained), got "
            f"{type(vera_model).__name__}"
        )
    if not isinstance(adapter_name, str) or adapter_name not in vera_model.peft_config:
        raise ValueError(
            f"adapter_name {adapter_name!r} is not an adapter of this model; it has {list(vera_model.peft_config)}"
        )


def _check_rank(rank) -> None:
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be None (exact export at rank r) or an int >= 1, got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be None (exact export at rank r) or an int >= 1, got {rank}")


def _check_dtype(dtype) -> None:
    if dtype not in _DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in _DTYPES)
        raise TypeError(f"dtype must be one of torch.{{{names}}}, got {dtype!r}")


def _check_out_dir(out_dir) -> str:
    try:
        directory = os.fspath(out_dir)
    except TypeError:
        raise TypeError(f"out_dir must be a path (str or os.PathLike), got {type(out_dir).__name__}") from None
    if not directory:
        raise ValueError("out_dir must be a path, got an empty string")
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ValueError(f"out_dir {directory!r} exists and is not a directory")
    config_path = os.path.join(directory, CONFIG_NAME)
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                peft_type = json.load(f).get("peft_type")
        except (OSError, ValueError, AttributeError):
            peft_type = "(unreadable)"
        if peft_type != "LORA":
            raise ValueError(
                f"out_dir {directory!r} already holds a PEFT adapter with peft_type {peft_type!r}; the export would "
                "replace it with a LoRA. Choose another out_dir (an earlier LoRA export there is replaced)"
            )
    return directory


# ---------------------------------------------------------------------------------------------- command line

CLI_USAGE = """python -m vera_ext export-lora ADAPTER_DIR OUT_DIR --base MODEL [--rank K] [--adapter-name NAME]
                                    [--dtype D]

Write the VeRA adapter saved in ADAPTER_DIR (PEFT's format, by PEFT or vera_ext) into OUT_DIR as a PEFT LoRA adapter:
exact at rank r, or the best rank-K approximation of every layer's delta with --rank K < r.

--base gives the model architecture: a transformers model directory (from save_pretrained) or its config.json. Only
the config is read: the delta weights do not depend on the base weights, and the projection comes from the adapter
(save_projection) or from its PRNG key. The model is built from the config on the CPU without initializing its
weights (memory is reserved for them, not written)."""


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m vera_ext export-lora",
        usage=CLI_USAGE.split("\n\n")[0],
        description="\n\n".join(CLI_USAGE.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="the VeRA adapter directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where the LoRA adapter is written")
    parser.add_argument(
        "--base", required=True, metavar="MODEL", help="a transformers model directory or its config.json"
    )
    parser.add_argument("--rank", type=_positive_int, metavar="K", help="the LoRA rank K (default: r, exact)")
    parser.add_argument(
        "--adapter-name",
        default="default",
        metavar="NAME",
        help="the adapter to export: 'default' (the default) is ADAPTER_DIR itself, another name its sub-folder "
        "ADAPTER_DIR/NAME (where save_pretrained puts adapters other than 'default')",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "float64"],
        default="float32",
        metavar="D",
        help="the factors' dtype: float32 (default), bfloat16, float16 or float64",
    )
    args = parser.parse_args(argv)
    try:
        config = export_lora_from_dirs(
            args.adapter_dir,
            args.out_dir,
            args.base,
            rank=args.rank,
            adapter_name=args.adapter_name,
            dtype=getattr(torch, args.dtype),
        )
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"python -m vera_ext export-lora: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out_dir}: LoRA r={config['r']} (lora_alpha={config['lora_alpha']}) on "
        f"{len(config['target_modules'])} modules"
        + (f", modules_to_save {config['modules_to_save']}" if config["modules_to_save"] else "")
    )
    return 0


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def export_lora_from_dirs(
    adapter_dir,
    out_dir,
    base,
    rank: Optional[int] = None,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """What the command line does: the model of ``base`` (a transformers model directory or config.json) built
    without initializing its weights, the VeRA adapter of ``adapter_dir`` loaded onto it (another than "default":
    from its sub-folder, after the "default" adapter beside it when there is one), :func:`export_lora`."""
    from .model import VeraModel

    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
    adapter_dir = os.fspath(adapter_dir)
    source = adapter_dir if adapter_name == "default" else os.path.join(adapter_dir, adapter_name)
    if not os.path.isfile(os.path.join(source, CONFIG_NAME)):
        where = "ADAPTER_DIR" if adapter_name == "default" else f"ADAPTER_DIR/{adapter_name} (--adapter-name)"
        raise FileNotFoundError(f"{where}: no {CONFIG_NAME} in {source!r}: not a PEFT adapter directory")
    out = _check_out_dir(out_dir)
    if os.path.isdir(out) and os.path.samefile(out, source):
        raise ValueError(f"OUT_DIR {out!r} is the adapter's own directory; choose another one")
    model = build_from_config(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the PRNG-projection notice of a save_projection=False adapter
        if source != adapter_dir and os.path.isfile(os.path.join(adapter_dir, CONFIG_NAME)):
            # an adapter saved beside "default": its projection is the one shared with "default" (sized for the
            # targets of both), so it loads after it, as save_pretrained's layout is meant to be read
            vera_model = VeraModel.from_pretrained(model, adapter_dir)
            vera_model.load_adapter(source, adapter_name)
        else:
            vera_model = VeraModel.from_pretrained(model, source, adapter_name=adapter_name)
    return export_lora(vera_model, adapter_name, out, rank, dtype=dtype)


def build_from_config(base) -> torch.nn.Module:
    """The transformers model of ``base`` (a directory with config.json, or a config.json), its class from the
    config's ``architectures``, in the config's dtype, on the CPU with uninitialized weights (built on the meta
    device, then ``to_empty``: nothing is initialized or read)."""
    try:
        import transformers
    except ImportError:
        raise ValueError("--base: reading a model config needs transformers (pip install transformers)") from None
    path = os.fspath(base)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--base: no config.json in the directory {os.fspath(base)!r}")
    elif not os.path.isfile(path):
        raise FileNotFoundError(
            f"--base: {path!r} is neither a model directory nor a config.json (vera_ext reads local files only)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"--base: {path!r} is not a transformers model config ({err})") from None
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise ValueError(
            f"--base: the config {path!r} names no transformers model class in 'architectures' ({names}); "
            "save the base model with save_pretrained, which records it"
        )
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, torch.float32)
    if dtype not in _DTYPES:
        dtype = torch.float32
    with torch.device("meta"):
        model = cls(config).to(dtype)
    return model.to_empty(device="cpu").eval()
