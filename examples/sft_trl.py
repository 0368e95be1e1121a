"""Fine-tune a causal LM with VeRA (vera_ext) and TRL's SFTTrainer, save the adapter, reload it with PEFT.

Runs offline in seconds on a CPU: the model is a tiny Llama built from a config and the tokenizer is trained in memory
on the example sentences. For a real model, replace ``build_model``/``build_tokenizer`` with
``AutoModelForCausalLM.from_pretrained(...)``/``AutoTokenizer.from_pretrained(...)``; the rest stays as it is.

    python examples/sft_trl.py --output-dir /tmp/vera-sft --steps 8
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import vera_ext  # noqa: E402

SENTENCES = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a bird sang in the tree",
    "the sun rose over the hill",
    "a fish swam in the lake",
    "the cat chased the dog",
    "the dog chased the bird",
    "a tree grew on the hill",
] * 4


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``texts`` (no download)."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama from a config; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="vera-sft-example")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)

    tokenizer = build_tokenizer(SENTENCES)
    model = vera_ext.get_vera_model(
        build_model(tokenizer), vera_ext.VeraConfig(r=16, target_modules=["q_proj", "v_proj"], d_initial=0.1)
    )
    model.print_trainable_parameters()

    training_args = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=32,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict({"text": SENTENCES}),
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")

    adapter_dir = os.path.join(args.output_dir, "adapter")
    trainer.save_model(adapter_dir)  # adapter_config.json + adapter_model.safetensors (PEFT's format)
    print("saved:", sorted(os.listdir(adapter_dir)))

    # Reload the adapter with PEFT onto a fresh copy of the base model; both must give the same logits.
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(build_model(tokenizer), adapter_dir).eval()
    # SFTConfig trains in bf16 autocast where the CPU/GPU supports it: accelerate wrapped model.forward for that;
    # unwrap it to compare both models in fp32.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    batch = tokenizer(SENTENCES[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = model(**batch).logits
        peft_logits = reloaded(**batch).logits
    max_diff = (ours - peft_logits).abs().max().item()
    print(f"max |logits(vera_ext) - logits(PEFT reload)| = {max_diff:.3e}")
    if not max_diff < 1e-5:
        raise SystemExit(f"PEFT reload differs from the trained model: {max_diff}")
    return max_diff


if __name__ == "__main__":
    main()
