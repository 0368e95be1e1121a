"""`python -m vera_ext demo`: fine-tune a real pretrained model (all-MiniLM-L6-v2) with VeRA, offline.

Stages, each printed: trainable parameters (VeRA vs LoRA at the same rank), held-out accuracy before training,
training with a progress bar, accuracy after, the saved PEFT-format adapter and its size on disk, reload into a
fresh base model (outputs must be identical), merge (merged vs unmerged outputs must agree) and unmerge.
``run(argv)`` returns a summary dict (used by the tests); ``main(argv)`` returns the exit status.

``--quantize nf4|int8`` first replaces every linear layer of the encoder by its bitsandbytes version (4-bit NF4 or
int8, built from the pretrained weights: ``vera_ext.bench.quantize_base``; the classification head stays fp32 and
trainable) and prints the weight memory of those layers before and after; the adapter then trains on the quantized
base, the reload goes into a fresh base quantized the same way, and the merge and unmerge stages are skipped with
the reason printed (the adapter stays unmerged).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Optional

import torch

from ..bench.quantize_base import (
    BASE_HELP,
    bitsandbytes_problem,
    quantize_linears,
    quiet_int8_cast_notice,
    weight_bytes,
)
from ..config import VeraConfig
from ..model import VeraModel, get_vera_model
from .dataset import DATASET_LICENSE, DATASET_NAME, LABELS, Split, batches, load_split
from .model import MODEL_LICENSE, MODEL_NAME, SentenceClassifier, load_encoder, model_path

__all__ = ["main", "run", "parse_args"]

SMOKE = dict(train_per_class=16, test_per_class=8, batch_size=8, steps=12, max_length=24)
CENTROID_PER_CLASS = 128  # enough examples to place the class means; more only costs time
CENTROID_SCALE = 20.0  # temperature of the nearest-centroid head: softmax neither flat nor saturated
FP32_MERGE_RTOL = 1e-4  # merged weights are rounded once in fp32: logits move by ~1e-6 relative
CHECK_PER_CLASS = 64  # held-out sentences per label for the reload / merge / unmerge comparisons
QUANTIZE = ("none", "nf4", "int8")
NO_MERGE_REASON = "merging into a quantized base layer is not part of this demo; the adapter stays unmerged"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vera_ext demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training set (default 1)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--rank", type=int, default=256, help="VeRA rank r (default 256, PEFT's default)")
    p.add_argument(
        "--targets",
        default="query,value",
        help="comma-separated module names to adapt (default: query,value, the attention projections)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-2, help="learning rate of VeRA's lambda vectors")
    p.add_argument("--head-lr", type=float, default=6e-3, help="learning rate of the classification head")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence (longer ones are truncated)")
    p.add_argument("--train-per-class", type=int, default=None, help="training examples per label (default all)")
    p.add_argument("--test-per-class", type=int, default=None, help="held-out examples per label (default all)")
    p.add_argument(
        "--output", default=None, help="adapter directory to write (default: a temporary directory, removed at exit)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="reduced run for CI: 32 training and 16 held-out sentences, 12 steps, every stage",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="none",
        help="the encoder's linear layers: none (fp32, the default), nf4 (bitsandbytes 4-bit NormalFloat) or int8 "
        "(bitsandbytes LLM.int8() weights); quantized, the merge stages are skipped (needs bitsandbytes)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    problem = bitsandbytes_problem(args.quantize, "--quantize")
    if problem:
        p.error(problem)
    if args.smoke:
        for key, value in SMOKE.items():  # options given explicitly still win
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    for name in ("rank", "batch_size", "max_length", "steps", "train_per_class", "test_per_class", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.epochs <= 0:
        p.error(f"--epochs must be > 0, got {args.epochs}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.targets:
        p.error("--targets must name at least one module")
    return args


def run(argv=None) -> dict[str, Any]:
    """Run the demo; returns what it measured (see the keys set below)."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    summary: dict[str, Any] = {"stages": [], "device": str(device), "seed": args.seed, "quantize": args.quantize}
    out_dir, temporary = args.output, args.output is None
    if temporary:
        out_dir = tempfile.mkdtemp(prefix="vera_demo_")
    try:
        with quiet_int8_cast_notice():  # (BASE_HELP, printed by _quantize, says it once)
            _run(args, device, out_dir, temporary, summary)
    finally:
        if temporary:
            shutil.rmtree(out_dir, ignore_errors=True)
    return summary


def _run(args, device, out_dir, temporary, summary) -> None:
    t_start = time.perf_counter()
    say(f"model    {MODEL_NAME}  [{MODEL_LICENSE}]\n         from {model_path()}")
    train, test = load_split("train"), load_split("test")
    if args.train_per_class:
        train = train.subset(args.train_per_class)
    if args.test_per_class:
        test = test.subset(args.test_per_class)
    say(
        f"data     {DATASET_NAME}\n         [{DATASET_LICENSE}]\n"
        f"         {len(train)} training / {len(test)} held-out sentences, labels {', '.join(LABELS)}"
    )
    summary.update(n_train=len(train), n_test=len(test))
    threads = f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    say(f"device   {device}{threads}, seed {args.seed}" + ("  (--smoke: reduced run)" if args.smoke else ""))

    encoder, tokenizer = load_encoder()
    classifier = SentenceClassifier(encoder, len(LABELS)).to(device)
    if args.quantize != "none":
        _quantize(classifier, args.quantize, device, summary)
    # Before: the pretrained embeddings with a nearest-centroid head (no training), the honest baseline.
    centroid_data = train.subset(min(CENTROID_PER_CLASS, len(train)))
    embeddings = _embed(classifier, centroid_data, tokenizer, args, device)
    classifier.init_head_from_centroids(embeddings, centroid_data.labels.to(device), CENTROID_SCALE)

    config = VeraConfig(r=args.rank, target_modules=list(args.targets), modules_to_save=["head"])
    vera = get_vera_model(classifier, config)
    _report_parameters(vera, args.rank, summary)

    majority = max(float((test.labels == c).float().mean()) for c in range(len(LABELS)))
    logits_before = _logits(vera, test, tokenizer, args, device)
    summary["acc_before"] = _accuracy(logits_before, test)
    summary["majority"] = majority
    say(
        f"\nheld-out accuracy before training: {summary['acc_before']:.1%}  "
        f"(pretrained embeddings, nearest-centroid head; majority class {majority:.1%})"
    )
    summary["stages"].append("before")

    _train(vera, train, tokenizer, args, device, summary)
    summary["stages"].append("train")

    logits_after = _logits(vera, test, tokenizer, args, device)
    summary["acc_after"] = _accuracy(logits_after, test)
    say(
        f"held-out accuracy after training:  {summary['acc_after']:.1%}  "
        f"({(summary['acc_after'] - summary['acc_before']) * 100:+.1f} points)"
    )
    summary["stages"].append("after")

    _save(vera, out_dir, temporary, summary)
    # Reload / merge / unmerge are compared on a slice of the held-out set (the first rows of each label).
    check = test.subset(min(CHECK_PER_CLASS, len(test)))
    logits_check = _logits(vera, check, tokenizer, args, device)
    _reload_merge_unmerge(vera, out_dir, logits_check, check, tokenizer, args, device, summary)
    if args.quantize != "none":
        summary["merge_skipped"] = NO_MERGE_REASON
        say(f"\nmerge and unmerge skipped (--quantize {args.quantize}): {NO_MERGE_REASON}")
    summary["total_seconds"] = time.perf_counter() - t_start
    say(f"\ntotal wall time {summary['total_seconds']:.1f} s")


# ------------------------------------------------------------------------------------------------ stages


def _quantize(classifier: SentenceClassifier, kind: str, device, summary: dict) -> None:
    """Quantize every linear layer of the encoder in place (the head stays fp32); print and record the bytes of
    those layers' weights, biases and quantization statistics, measured before and after."""
    linears = {n: m for n, m in classifier.encoder.named_modules() if type(m) is torch.nn.Linear}
    before = weight_bytes(linears.values())
    names = quantize_linears(classifier.encoder, kind, device)
    after = weight_bytes(classifier.encoder.get_submodule(n) for n in names)
    say(
        f"\nquantized {len(names)} linear layers of the encoder to {kind} ({BASE_HELP[kind]}); the head stays fp32\n"
        f"  their weight memory (weights, biases, quantization statistics): {_size(before)} fp32 -> "
        f"{_size(after)} {kind}, {_size(before - after)} saved ({before / after:.1f}x smaller)"
    )
    summary.update(quantized_layers=len(names), weight_bytes_before=before, weight_bytes_after=after)
    summary["stages"].append("quantize")


def _report_parameters(vera: VeraModel, rank: int, summary: dict) -> None:
    layers = vera.vera_layers()
    lam = sum(
        p.numel()
        for layer in layers.values()
        for store in (layer.vera_lambda_b, layer.vera_lambda_d)
        for p in store.values()
        if p.requires_grad
    )
    head = sum(
        p.numel()
        for w in vera.modules_to_save_wrappers().values()
        for p in w.modules_to_save.parameters()
        if p.requires_grad
    )
    # What LoRA would train on the same layers at the same rank: A (r x in) and B (out x r) per layer.
    lora = sum(rank * (layer.in_features + layer.out_features) for layer in layers.values())
    trainable, total = vera.get_nb_trainable_parameters()
    proj = vera.vera_projection
    shared = proj.vera_A.numel() + proj.vera_B.numel()
    say(f"\nVeRA r={rank} on {len(layers)} layers ({', '.join(sorted({p.rsplit('.', 1)[-1] for p in layers}))})")
    say(f"  trainable  VeRA lambda_d + lambda_b: {lam:>10,d}")
    say(f"             LoRA at r={rank} would train: {lora:>10,d}  ({lora / lam:,.0f}x more; computed, not trained)")
    say(f"             classification head:      {head:>10,d}  (modules_to_save, saved with the adapter)")
    say(f"  frozen     shared random A and B:    {shared:>10,d}  (one pair for all layers; buffers)")
    say(f"  all parameters {total:,d}, trainable {trainable:,d} ({100 * trainable / total:.4f}%)")
    summary.update(
        vera_params=lam,
        lora_params=lora,
        head_params=head,
        trainable_params=trainable,
        total_params=total,
        n_adapted_layers=len(layers),
    )
    summary["stages"].append("parameters")


def _train(vera: VeraModel, train: Split, tokenizer, args, device, summary: dict) -> None:
    from tqdm.auto import tqdm

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    steps = args.steps or max(1, round(args.epochs * steps_per_epoch))
    lam = [p for n, p in vera.named_parameters() if p.requires_grad and "vera_lambda_" in n]
    head = [p for n, p in vera.named_parameters() if p.requires_grad and "vera_lambda_" not in n]
    opt = torch.optim.AdamW([{"params": lam, "lr": args.lr}, {"params": head, "lr": args.head_lr}], weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup + 1)))
    )
    shuffle = torch.Generator().manual_seed(args.seed)
    say(
        f"\ntraining {steps} steps (batch {args.batch_size}, {steps / steps_per_epoch:.2g} pass(es) over the data), "
        f"AdamW lr {args.lr:g} (lambdas) / {args.head_lr:g} (head), linear warmup and decay"
    )
    losses: list[float] = []
    vera.train()
    t0 = time.perf_counter()
    bar = tqdm(total=steps, desc="train", unit="step", disable=args.no_progress, dynamic_ncols=True)
    running = None
    while len(losses) < steps:
        order = torch.randperm(len(train), generator=shuffle)
        for ids, mask, labels in batches(train, tokenizer, args.batch_size, args.max_length, order):
            loss = torch.nn.functional.cross_entropy(vera(ids.to(device), mask.to(device)), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            running = losses[-1] if running is None else 0.9 * running + 0.1 * losses[-1]
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update(1)
            if len(losses) == steps:
                break
    bar.close()
    seconds = time.perf_counter() - t0
    quarter = max(1, steps // 4)
    first, last = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
    say(
        f"trained in {seconds:.1f} s ({seconds / steps:.2f} s/step); mean loss of the first {quarter} steps "
        f"{first:.4f} -> last {quarter} steps {last:.4f}"
    )
    summary.update(steps=steps, losses=losses, loss_first=first, loss_last=last, train_seconds=seconds)


def _save(vera: VeraModel, out_dir: str, temporary: bool, summary: dict) -> None:
    from safetensors import safe_open

    vera.save_pretrained(out_dir)
    files = {
        name: os.path.getsize(os.path.join(out_dir, name))
        for name in sorted(os.listdir(out_dir))
        if os.path.isfile(os.path.join(out_dir, name))
    }
    parts = {"lambda": 0, "projection": 0, "head": 0}
    with safe_open(os.path.join(out_dir, "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            kind = (
                "projection"
                if key in ("base_model.vera_A", "base_model.vera_B")
                else ("lambda" if "vera_lambda_" in key else "head")
            )
            parts[kind] += t.numel() * t.element_size()
    where = f"{out_dir}" + ("  (temporary: pass --output DIR to keep it)" if temporary else "")
    say(f"\nsaved adapter (PEFT format) to {where}")
    for name, size in files.items():
        say(f"  {name:<28} {_size(size):>10}")
    lora_bytes = summary["lora_params"] * 4
    say(
        f"  of which: lambdas {_size(parts['lambda'])}, head {_size(parts['head'])}, shared A/B "
        f"{_size(parts['projection'])} (save_projection=False would regenerate A/B from projection_prng_key)"
    )
    say(
        f"  for comparison: fp32 LoRA weights at the same rank {_size(lora_bytes)}; the base model's weights "
        f"{_size(os.path.getsize(model_path() / 'model.safetensors'))}"
    )
    summary.update(output_dir=out_dir, adapter_files=files, adapter_bytes_by_part=parts)
    summary["stages"].append("save")


def _reload_merge_unmerge(vera, out_dir, logits_trained, test, tokenizer, args, device, summary) -> None:
    fresh_encoder, _ = load_encoder()
    fresh = SentenceClassifier(fresh_encoder, len(LABELS)).to(device)  # a new head: it must come from the adapter
    if args.quantize != "none":  # the same quantized base (quantization is deterministic)
        quantize_linears(fresh.encoder, args.quantize, device)
    reloaded = VeraModel.from_pretrained(fresh, out_dir).to(device)
    same_tensors = _adapter_tensors_equal(vera, reloaded)
    logits_reloaded = _logits(reloaded, test, tokenizer, args, device)
    reload_diff = (logits_reloaded - logits_trained).abs().max().item()
    summary.update(
        reload_tensors_equal=same_tensors,
        reload_max_abs_diff=reload_diff,
        reload_ok=same_tensors and reload_diff == 0.0,
    )
    say(
        f"\nreloaded into a fresh base model from {out_dir}\n  adapter tensors identical: {same_tensors}; "
        f"logits on {len(test)} held-out sentences max |diff| = {reload_diff:.3g}"
        + ("  (bit-identical)" if reload_diff == 0 else "")
    )
    summary["stages"].append("reload")
    if args.quantize != "none":
        return

    reloaded.merge_adapter()
    logits_merged = _logits(reloaded, test, tokenizer, args, device)
    merge_diff = (logits_merged - logits_reloaded).abs().max().item()
    tol = FP32_MERGE_RTOL * max(1.0, logits_reloaded.abs().max().item())
    acc_merged = _accuracy(logits_merged, test)
    summary.update(merge_max_abs_diff=merge_diff, merge_tol=tol, merge_ok=merge_diff <= tol, acc_merged=acc_merged)
    say(
        f"merged (W += lambda_b B lambda_d A, in fp32): merged vs unmerged logits max |diff| = {merge_diff:.3g} "
        f"(tolerance {tol:.1g}) -> {'agree' if merge_diff <= tol else 'DISAGREE'}\n"
        f"  merged model's accuracy on those sentences {acc_merged:.1%}"
    )
    summary["stages"].append("merge")

    reloaded.unmerge_adapter()
    logits_unmerged = _logits(reloaded, test, tokenizer, args, device)
    unmerge_diff = (logits_unmerged - logits_reloaded).abs().max().item()
    summary.update(unmerge_max_abs_diff=unmerge_diff, unmerge_ok=unmerge_diff <= tol)
    say(
        f"unmerged: logits back to the adapter's, max |diff| = {unmerge_diff:.3g} "
        f"-> {'agree' if unmerge_diff <= tol else 'DISAGREE'}"
    )
    summary["stages"].append("unmerge")


# ------------------------------------------------------------------------------------------------ helpers


def _logits(model, data: Split, tokenizer, args, device) -> torch.Tensor:
    """(N, labels) float32 logits on CPU, in data order, eval mode."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for ids, mask, _ in batches(data, tokenizer, 64, args.max_length):
            out.append(model(ids.to(device), mask.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def _embed(classifier: SentenceClassifier, data: Split, tokenizer, args, device) -> torch.Tensor:
    classifier.eval()
    with torch.no_grad():
        return torch.cat(
            [
                classifier.embed(ids.to(device), mask.to(device))
                for ids, mask, _ in batches(data, tokenizer, 64, args.max_length)
            ]
        )


def _accuracy(logits: torch.Tensor, data: Split) -> float:
    return float((logits.argmax(-1) == data.labels).float().mean())


def _adapter_tensors_equal(a: VeraModel, b: VeraModel) -> bool:
    from ..checkpoint import adapter_state_dict

    sa, sb = adapter_state_dict(a, "default"), adapter_state_dict(b, "default")
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,d} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: Optional[list] = None) -> int:
    """Run the demo; 0 when reload, merge and unmerge all checked out (merge and unmerge: unless skipped on a
    quantized base), 1 otherwise."""
    summary = run(argv)
    merged_ok = "merge_skipped" in summary or (summary["merge_ok"] and summary["unmerge_ok"])
    ok = summary["reload_ok"] and merged_ok
    if not ok:
        print("demo: a check failed (see above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
