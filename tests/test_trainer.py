"""VeraModel inside the training stacks users use: transformers' Trainer (default arguments, checkpoints, resume),
TRL's SFTTrainer, accelerate with bf16, and the examples/sft_trl.py script. Tiny models, CPU only."""

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from peft import PeftModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import vera_ext  # noqa: E402
from vera_models import tiny_llama  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64  # tests/vera_models.tiny_llama's vocabulary


def vera(model):
    return vera_ext.get_vera_model(model, vera_ext.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))


def lm_dataset(n=24, length=12):
    """input_ids/attention_mask/labels plus a "text" column the model does not take (remove_unused_columns)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return datasets.Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": ids.tolist(),
            "text": [f"sample {i}" for i in range(n)],
        }
    )


def training_args(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def lambdas(vm):
    return {n: p.detach().clone() for n, p in vm.named_parameters() if "vera_lambda" in n}


def test_a_transformers_model_is_recognised_as_an_adapter_model():
    vm = vera(tiny_llama())
    assert isinstance(vm, vera_ext.VeraModel) and isinstance(vm, PeftModel)
    assert vm.get_base_model() is vm.model and vm.base_model.model is vm.model
    assert vm.config is vm.model.config and vm.generation_config is vm.model.generation_config
    assert vm.prepare_inputs_for_generation.__func__ is type(vm.model).prepare_inputs_for_generation
    assert not hasattr(vm, "get_prompt")  # PeftModel's own members are hidden: it behaves as a plain VeraModel
    plain = vera_ext.get_vera_model(
        torch.nn.Sequential(torch.nn.Linear(4, 4)), vera_ext.VeraConfig(r=2, target_modules=["0"])
    )
    assert not isinstance(plain, PeftModel)


def test_checkpointing_switches_reach_the_wrapped_model():
    vm = vera(tiny_llama())
    vm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in vm.model.model.layers)
    vm.enable_input_require_grads()  # what TRL calls for checkpointing with a frozen embedding
    vm.train()
    out = vm(input_ids=torch.randint(0, VOCAB, (2, 6)), labels=torch.randint(0, VOCAB, (2, 6)))
    out.loss.backward()
    assert all(p.grad is not None for n, p in vm.named_parameters() if "vera_lambda" in n)
    vm.gradient_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in vm.model.model.layers)


def test_trainer_with_default_arguments_trains(tmp_path):
    vm = vera(tiny_llama())
    before = lambdas(vm)
    trainer = Trainer(model=vm, args=training_args(tmp_path), train_dataset=lm_dataset())
    assert trainer.args.remove_unused_columns
    trainer.train()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    after = lambdas(vm)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values())


def test_state_dict_holds_the_shared_projection_once(tmp_path):
    vm = vera(tiny_llama())
    sd = vm.state_dict()
    assert [k for k in sd if k.endswith(("vera_A", "vera_B"))] == ["vera_projection.vera_A", "vera_projection.vera_B"]
    save_file(sd, str(tmp_path / "model.safetensors"))  # refuses tensors sharing storage under several keys
    other = vera(tiny_llama(seed=1))
    other.load_state_dict(sd, strict=True)
    for name, value in vm.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name


def _run(output_dir, steps, resume=None, **overrides):
    vm = vera(tiny_llama())
    args = training_args(output_dir, max_steps=steps, save_strategy="steps", save_steps=3, **overrides)
    trainer = Trainer(model=vm, args=args, train_dataset=lm_dataset())
    trainer.train(resume_from_checkpoint=resume)
    return vm, trainer


def test_checkpoints_are_peft_adapters_and_resume_matches_an_uninterrupted_run(tmp_path):
    straight, t_straight = _run(tmp_path / "a", 6)
    ckpt = tmp_path / "a" / "checkpoint-3"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}

    resumed, t_resumed = _run(tmp_path / "b", 6, resume=str(ckpt))
    a, b = lambdas(straight), lambdas(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    sa, sb = t_straight.optimizer.state_dict()["state"], t_resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sa[i][key], sb[i][key], atol=1e-6, rtol=0)

    # The final checkpoint loads into PEFT and gives the trained model's logits.
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a" / "checkpoint-6")).eval()
    straight.eval()
    x = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, straight(input_ids=x).logits, atol=1e-5, rtol=0)


def test_trainer_with_non_reentrant_gradient_checkpointing(tmp_path):
    vm = vera(tiny_llama())
    before = lambdas(vm)
    args = training_args(
        tmp_path, max_steps=2, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    Trainer(model=vm, args=args, train_dataset=lm_dataset()).train()  # raised "already unpacked once" before
    assert vm.model.is_activation_checkpointing
    after = lambdas(vm)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_sft_trainer_trains(tmp_path):
    trl = pytest.importorskip("trl")
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import sft_trl
    finally:
        sys.path.remove(os.path.join(REPO, "examples"))
    tokenizer = sft_trl.build_tokenizer(sft_trl.SENTENCES)
    vm = vera(sft_trl.build_model(tokenizer))
    before = lambdas(vm)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=32,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=vm,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": sft_trl.SENTENCES}),
        processing_class=tokenizer,
    )
    trainer.train()
    after = lambdas(vm)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values())


def test_accelerate_bf16_keeps_lambdas_fp32():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        vm = vera(tiny_llama())
        before = lambdas(vm)
        optimizer = torch.optim.AdamW([p for p in vm.parameters() if p.requires_grad], lr=1e-2)
        ds = lm_dataset(n=12).remove_columns("text").with_format("torch")
        loader = torch.utils.data.DataLoader(ds, batch_size=4)
        vm, optimizer, loader = accelerator.prepare(vm, optimizer, loader)
        for batch in loader:
            loss = vm(**batch).loss
            assert torch.isfinite(loss)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        after = lambdas(accelerator.unwrap_model(vm))
        assert all(v.dtype == torch.float32 for v in after.values())
        assert any(not torch.equal(before[k], after[k]) for k in before)
    finally:
        AcceleratorState._reset_state(True)


def test_example_sft_trl_runs(tmp_path):
    pytest.importorskip("trl")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "sft_trl.py"), "--output-dir", str(tmp_path), "--steps", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "max |logits(vera_ext) - logits(PEFT reload)|" in result.stdout
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
