"""vera_ext.export_lora: a VeRA adapter written as a PEFT LoRA adapter directory. The references are PEFT's own:
PeftModel.from_pretrained loads the export onto the base model (its outputs must be the VeRA model's), PEFT's LoRA
save gives the key names, and a dense float64 SVD gives the best rank-k error (Eckart-Young)."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

import vera_ext
from vera_ext import export_lora
from vera_ext.lora_export import best_rank_k, lora_factors
from vera_ext.lora_export import main as cli_main

import vera_models as vm

QV = ["q_proj", "v_proj"]


def _peft_load(base, directory):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, directory).eval()


def _llama_pair(r=8, **kwargs):
    base, twin = vm.twins(vm.tiny_llama)
    vera = vm.ours(base, r=r, target_modules=QV, **kwargs)
    vm.randomize_lambdas(vera)
    return vera.eval(), twin


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _assert_same_outputs(got, want, base_out):
    # fp32 rounding: the adapter's share of the output (want - base) is reproduced to ~1e-6 of its size
    scale = (want - base_out).abs().max()
    assert scale > 1e-2  # the adapter changes the output: the comparison below can fail
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


def _listing(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else None


# --------------------------------------------------------------------------------------------- exact export


def test_full_rank_export_is_the_vera_model_in_peft(tmp_path):
    vera, base = _llama_pair()
    x = vm.token_ids()
    want, plain = _logits(vera, x), _logits(base, x)
    config = export_lora(vera, "default", tmp_path / "lora")
    lora = _peft_load(base, tmp_path / "lora")
    _assert_same_outputs(_logits(lora, x), want, plain)

    written = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert written == json.loads(json.dumps(config))
    assert (written["peft_type"], written["r"], written["lora_alpha"], written["bias"]) == ("LORA", 8, 8, "none")
    assert lora.peft_config["default"].peft_type.value == "LORA"
    assert set(written["target_modules"]) == set(vera.targeted_module_names)
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    for path, layer in vera.vera_layers().items():
        assert tensors[f"base_model.model.{path}.lora_A.weight"].shape == (8, layer.in_features)
        assert tensors[f"base_model.model.{path}.lora_B.weight"].shape == (layer.out_features, 8)


def test_key_names_are_those_peft_saves_for_a_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    vera, base = _llama_pair()
    export_lora(vera, "default", tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(base, LoraConfig(r=8, target_modules=QV)).save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_factors_are_the_vera_factors():
    vera, _ = _llama_pair()
    for path, (lora_A, lora_B) in lora_factors(vera, "default").items():
        layer = vera.get_submodule(f"model.{path}")
        delta = layer.get_delta_weight("default").double()
        torch.testing.assert_close(lora_B @ lora_A, delta, rtol=1e-6, atol=1e-7)


def test_conv1d_model_exports_with_fan_in_fan_out(tmp_path):
    base, twin = vm.twins(vm.tiny_gpt2)
    vera = vm.ours(base, r=8, target_modules=["c_attn"], fan_in_fan_out=True).eval()
    vm.randomize_lambdas(vera)
    x = vm.token_ids()
    want, plain = _logits(vera, x), _logits(twin, x)
    config = export_lora(vera, "default", tmp_path / "lora")
    assert config["fan_in_fan_out"] is True
    _assert_same_outputs(_logits(_peft_load(twin, tmp_path / "lora"), x), want, plain)


def test_modules_to_save_are_exported_as_peft_loads_them(tmp_path):
    base, twin = vm.twins(vm.mlp)
    vera = vm.ours(base, r=4, target_modules=["lin0", "lin1"], modules_to_save=["head"]).eval()
    vm.randomize_lambdas(vera)
    with torch.no_grad():
        vera.model.head.modules_to_save["default"].weight.mul_(-2.0)
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, plain = vera(x), twin(x)
    config = export_lora(vera, "default", tmp_path / "lora")
    assert config["modules_to_save"] == ["head"]
    lora = _peft_load(twin, tmp_path / "lora")
    with torch.no_grad():
        _assert_same_outputs(lora(x), want, plain)


def test_bf16_factors_on_request(tmp_path):
    vera, _ = _llama_pair()
    export_lora(vera, "default", tmp_path / "lora", dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    exact = lora_factors(vera, "default")
    for path, (lora_A, lora_B) in exact.items():
        got = tensors[f"base_model.model.{path}.lora_A.weight"]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, lora_A.to(torch.bfloat16))


def test_second_adapter_and_merged_adapter(tmp_path):
    vera, base = _llama_pair()
    vera.add_adapter("other", vera_ext.VeraConfig(r=8, target_modules=["q_proj"]))
    vm.randomize_lambdas(vera, seed=5)
    export_lora(vera, "other", tmp_path / "unmerged")
    assert json.loads((tmp_path / "unmerged" / "adapter_config.json").read_text())["target_modules"] == sorted(
        p for p in vera.targeted_module_names if p.endswith("q_proj")
    )
    vera.set_adapter("other")
    x = vm.token_ids()
    want = _logits(vera, x)
    vera.merge_adapter(["other"])
    with pytest.warns(UserWarning, match="merged into this model's base weights"):
        export_lora(vera, "other", tmp_path / "merged")
    a = load_file(tmp_path / "unmerged" / "adapter_model.safetensors")
    b = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _assert_same_outputs(_logits(_peft_load(base, tmp_path / "merged"), x), want, _logits(vm.tiny_llama(), x))


# ------------------------------------------------------------------------------------------ truncated ranks


@pytest.mark.parametrize("out_f, in_f, r, k", [(40, 30, 12, 5), (9, 30, 12, 4), (40, 7, 12, 9), (6, 5, 12, 3)])
def test_best_rank_k_is_the_dense_svd_optimum(out_f, in_f, r, k):
    g = torch.Generator().manual_seed(out_f * 100 + in_f)
    lora_B = torch.randn(out_f, r, generator=g, dtype=torch.float64)
    lora_A = torch.randn(r, in_f, generator=g, dtype=torch.float64)
    delta = lora_B @ lora_A
    B_k, A_k = best_rank_k(lora_B, lora_A, k)
    assert B_k.shape == (out_f, k) and A_k.shape == (k, in_f)
    S = torch.linalg.svdvals(delta)
    error = delta - B_k @ A_k
    tol = 1e-10 * S[0].item()
    spectral = S[k].item() if k < S.numel() else 0.0
    frobenius = S[k:].square().sum().sqrt().item()
    assert abs(torch.linalg.matrix_norm(error, ord=2).item() - spectral) <= tol
    assert abs(torch.linalg.matrix_norm(error).item() - frobenius) <= tol
    # distinct singular values: the optimum is unique, so the product itself is the dense truncation
    U, S_, Vh = torch.linalg.svd(delta, full_matrices=False)
    kept = min(k, S_.numel())
    torch.testing.assert_close(B_k @ A_k, (U[:, :kept] * S_[:kept]) @ Vh[:kept], rtol=0, atol=tol)
    # balanced: S_k split evenly between the factors
    torch.testing.assert_close(B_k.norm(dim=0), A_k.norm(dim=1), rtol=1e-10, atol=1e-12)


def test_truncated_export_in_peft_is_the_dense_truncation(tmp_path):
    vera, base = _llama_pair(r=12)
    export_lora(vera, "default", tmp_path / "lora", rank=5)
    lora = _peft_load(base, tmp_path / "lora")
    assert lora.peft_config["default"].r == 5
    for path, layer in vera.vera_layers().items():
        delta = layer.get_delta_weight("default").double()
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        want = (U[:, :5] * S[:5]) @ Vh[:5]
        got = lora.base_model.model.get_submodule(path).get_delta_weight("default").double()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * S[0].item())


def test_rank_at_or_above_r_is_the_exact_export(tmp_path):
    vera, _ = _llama_pair()
    files = {}
    for name, rank in (("none", None), ("r", 8), ("above", 20)):
        export_lora(vera, "default", tmp_path / name, rank=rank)
        files[name] = load_file(tmp_path / name / "adapter_model.safetensors")
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["r"] == 8
    for name in ("r", "above"):
        assert all(torch.equal(files[name][k], files["none"][k]) for k in files["none"])


# --------------------------------------------------------------------------------------------------- refusals


def test_refusals_name_the_argument_and_write_nothing(tmp_path):
    vera, _ = _llama_pair()
    out = tmp_path / "lora"
    cases = [
        ((vera.model, "default", out), {}, TypeError, "vera_model must be a vera_ext.VeraModel"),
        ((vera, "nope", out), {}, ValueError, "adapter_name 'nope'"),
        ((vera, "default", out), {"rank": 0}, ValueError, "rank must be"),
        ((vera, "default", out), {"rank": 2.0}, TypeError, "rank must be"),
        ((vera, "default", out), {"rank": True}, TypeError, "rank must be"),
        ((vera, "default", out), {"dtype": torch.int8}, TypeError, "dtype must be"),
        ((vera, "default", 3), {}, TypeError, "out_dir must be a path"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            export_lora(*args, **kwargs)
        assert not out.exists()
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    with pytest.raises(ValueError, match="out_dir .* exists and is not a directory"):
        export_lora(vera, "default", a_file)
    assert a_file.read_text() == "keep"
    vera.save_pretrained(tmp_path / "vera")
    before = {p: (tmp_path / "vera" / p).read_bytes() for p in os.listdir(tmp_path / "vera")}
    with pytest.raises(ValueError, match="already holds a PEFT adapter with peft_type 'VERA'"):
        export_lora(vera, "default", tmp_path / "vera")
    assert {p: (tmp_path / "vera" / p).read_bytes() for p in os.listdir(tmp_path / "vera")} == before


def test_bias_adapters_are_refused(tmp_path):
    base = vm.mlp()
    vera = vm.ours(base, r=4, target_modules=["lin0"], bias="vera_only")
    with pytest.raises(ValueError, match="bias='vera_only'"):
        export_lora(vera, "default", tmp_path / "lora")
    assert _listing(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    vera, _ = _llama_pair()

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_lora(vera, "default", tmp_path / "new" / "lora")
    assert _listing(tmp_path) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(OSError, match="disk full"):
        export_lora(vera, "default", tmp_path / "old")
    assert _listing(tmp_path / "old") == ["adapter_config.json"]
    assert (tmp_path / "old" / "adapter_config.json").read_text() == '{"peft_type": "LORA"}'


# -------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("save_projection", [True, False])
def test_cli_exports_a_saved_adapter(tmp_path, capsys, save_projection):
    vera, base = _llama_pair(save_projection=save_projection)
    vera.add_adapter("second", vera_ext.VeraConfig(r=8, target_modules=["v_proj"], save_projection=save_projection))
    vm.randomize_lambdas(vera, seed=11)
    x = vm.token_ids()
    want = {}
    for name in ("default", "second"):
        vera.set_adapter(name)
        want[name] = _logits(vera, x)
    vera.save_pretrained(tmp_path / "adapter")
    base.save_pretrained(tmp_path / "base")
    plain = _logits(base, x)
    argv = [str(tmp_path / "adapter"), str(tmp_path / "lora"), "--base", str(tmp_path / "base")]
    assert cli_main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    _assert_same_outputs(_logits(_peft_load(vm.tiny_llama(), tmp_path / "lora"), x), want["default"], plain)
    config_json = str(tmp_path / "base" / "config.json")
    argv = [str(tmp_path / "adapter"), str(tmp_path / "lora2"), "--base", config_json, "--adapter-name", "second"]
    assert cli_main(argv + ["--rank", "3"]) == 0
    lora = _peft_load(vm.tiny_llama(), tmp_path / "lora2")
    assert lora.peft_config["default"].r == 3
    assert cli_main(argv) == 0  # replaces the earlier LoRA export in place
    _assert_same_outputs(_logits(_peft_load(vm.tiny_llama(), tmp_path / "lora2"), x), want["second"], plain)


def test_cli_exports_an_adapter_saved_by_peft(tmp_path, capsys):
    base, twin = vm.twins(vm.tiny_llama)
    peft_vera = vm.peft_model(base, r=8, target_modules=QV).eval()
    vm.randomize_lambdas(peft_vera)
    x = vm.token_ids()
    want, plain = _logits(peft_vera, x), _logits(twin, x)
    peft_vera.save_pretrained(tmp_path / "adapter")
    twin.save_pretrained(tmp_path / "base")
    argv = [str(tmp_path / "adapter"), str(tmp_path / "lora"), "--base", str(tmp_path / "base")]
    assert cli_main(argv) == 0
    _assert_same_outputs(_logits(_peft_load(vm.tiny_llama(), tmp_path / "lora"), x), want, plain)


def test_cli_errors(tmp_path, capsys):
    vera, base = _llama_pair()
    vera.save_pretrained(tmp_path / "adapter")
    base.save_pretrained(tmp_path / "base")
    adapter, model = str(tmp_path / "adapter"), str(tmp_path / "base")
    cases = [
        ([str(tmp_path / "missing"), str(tmp_path / "o"), "--base", model], "ADAPTER_DIR: no adapter_config.json"),
        ([adapter, str(tmp_path / "o"), "--base", model, "--adapter-name", "x"], "ADAPTER_DIR/x"),
        ([adapter, str(tmp_path / "o"), "--base", str(tmp_path)], "--base: no config.json"),
        ([adapter, adapter, "--base", model], "already holds a PEFT adapter"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exit_:
        cli_main([adapter, str(tmp_path / "o"), "--base", model, "--rank", "0"])
    assert exit_.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


def test_cli_is_registered():
    from vera_ext import __main__

    assert "export-lora" in __main__.COMMANDS
    with pytest.raises(SystemExit) as exit_:
        __main__.main(["export-lora", "--help"])
    assert exit_.value.code == 0


# ------------------------------------------------------------------------------------------------- benchmark


def test_export_bench_times_both_and_checks_both_exports():
    from vera_ext.bench.export_case import export_lora_bench, format_export_table

    result = export_lora_bench(r=16, rounds=1, quick=True)
    assert {(row["pair"], row["impl"]) for row in result["rows"]} == {
        (pair, impl) for pair in ("files", "in memory") for impl in ("vera_ext", "peft")
    }
    assert all(len(row["samples_s"]) == 1 and row["median_s"] > 0 for row in result["rows"])
    assert result["adapter_term_max_abs"] > 1e-3
    assert result["max_abs_diff"]["vera_ext"] <= 1e-5 * max(1.0, result["adapter_term_max_abs"])
    assert result["delta_rel_error"]["vera_ext"] <= 1e-6  # fp32 rounding of the two factors
    assert result["delta_rel_error"]["peft"] <= 1e-4  # PEFT's fp32 SVD: close too, not exact
    table = format_export_table(result)
    assert "PEFT / vera_ext" in table and "files" in table
