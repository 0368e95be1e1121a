"""The adapter bank (docs/DESIGN.md §2.6): every adapter's lambdas are rows of two stacked tables per layer, the
ParameterDict entries views of them; mixed batches read the tables through one index tensor per model call;
load_adapters checks every adapter before inserting any."""

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vera_ext.adapter_bank import GROWTH, GROWTH_ROWS, MAPPED_BYTES, MAPPED_GROWTH
from vera_ext.config import VeraConfig

from vera_models import assert_unchanged, mlp, ours, randomize_lambdas, snapshot, tiny_llama, token_ids


def _model(extra: int = 2):
    vm = ours(mlp(), r=6, target_modules=["lin0", "lin1"], init_weights=False)
    for i in range(extra):
        vm.add_adapter(f"a{i}", VeraConfig(r=6, target_modules=["lin0", "lin1"], init_weights=False))
    vm.add_adapter("c", VeraConfig(r=4, target_modules=["lin1"], init_weights=False))  # lin0 lacks "c"
    randomize_lambdas(vm)
    return vm


def _linked(vm) -> bool:
    return all(layer._bank.linked() for layer in vm.vera_layers().values())


def _row(layer, name):
    bank = layer._bank
    slot = bank.slot_of[name]
    return bank.lambda_d_table[slot], bank.lambda_b_table[slot]


def test_lambdas_are_views_of_their_bank_rows():
    vm = _model()
    assert _linked(vm)
    layer = vm.model.lin1
    ld, lb = _row(layer, "c")
    torch.testing.assert_close(ld[:4], layer.vera_lambda_d["c"].detach())
    assert torch.all(ld[4:] == 0)  # (rank 4 of width 6: the rest stays 0)
    with torch.no_grad():
        layer.vera_lambda_b["c"].add_(1.0)
    torch.testing.assert_close(lb, layer.vera_lambda_b["c"].detach())
    # a layer lacking an adapter holds a zero row at its slot: its term is 0
    slot = vm._adapter_slots.slots["c"]
    assert torch.all(vm.model.lin0._bank.lambda_b_table[slot] == 0)
    # the state dict keeps PEFT's keys, one tensor per adapter and layer
    keys = [k for k in vm.state_dict() if "vera_lambda" in k]
    assert len(keys) == 2 * (2 * 3) + 2 and all("table" not in k for k in vm.state_dict())


def test_delete_frees_the_slot_for_reuse_and_detaches_the_old_parameters():
    vm = _model()
    layer = vm.model.lin0
    old = layer.vera_lambda_b["a0"]
    slot = vm._adapter_slots.slots["a0"]
    vm.delete_adapter("a0")
    assert torch.all(layer._bank.lambda_b_table[slot] == 0)
    vm.add_adapter("new", VeraConfig(r=6, target_modules=["lin0"], init_weights=False))
    assert vm._adapter_slots.slots["new"] == slot
    before = layer.vera_lambda_b["new"].detach().clone()
    with torch.no_grad():
        old.add_(100.0)  # (an optimizer still holding the deleted Parameter must not write into "new")
    torch.testing.assert_close(layer.vera_lambda_b["new"].detach(), before)
    assert _linked(vm)


def test_growth_keeps_parameter_objects_values_and_optimizer():
    vm = _model(extra=0)
    layer = vm.model.lin0
    p = layer.vera_lambda_b["default"]
    values = p.detach().clone()
    opt = torch.optim.SGD([p], lr=0.5)
    capacity = layer._bank.capacity
    for i in range(GROWTH_ROWS + 10):
        vm.add_adapter(f"g{i}", VeraConfig(r=6, target_modules=["lin0", "lin1"], init_weights=False))
    assert layer._bank.capacity > capacity
    rows = vm._adapter_slots.high_water
    assert rows <= layer._bank.capacity <= max(rows * GROWTH + 1, rows + GROWTH_ROWS)
    assert layer.vera_lambda_b["default"] is p
    torch.testing.assert_close(p.detach(), values)
    p.grad = torch.ones_like(p)
    opt.step()
    torch.testing.assert_close(_row(layer, "default")[1], values - 0.5)
    assert _linked(vm)


def test_a_large_cpu_bank_is_a_mapping_of_its_own_that_grows_by_half_and_keeps_everything():
    """From MAPPED_BYTES on, a CPU bank is an anonymous mapping (its unwritten rows are zero pages): it grows by
    MAPPED_GROWTH, keeps values, created Parameters and their optimizer, and its copies are ordinary tensors."""
    from vera_ext.layer import VeraLinear

    layer = VeraLinear(torch.nn.Linear(16, 1024), r=16, adapter_name="p", init_weights=False)
    p = layer.vera_lambda_b["p"]
    values = p.detach().clone()
    row_bytes = (16 + 1024) * 4
    count = MAPPED_BYTES // row_bytes + GROWTH_ROWS
    for i in range(count):
        layer.update_layer(f"m{i}", 16, init_weights=False)
    bank = layer._bank
    assert bank.mapped and bank.nbytes() >= MAPPED_BYTES and bank.capacity >= count + 1
    assert bank.used_bytes() == (count + 1) * row_bytes
    assert torch.all(bank.lambda_b_table[count + 1 :] == 0) and torch.all(bank.lambda_d_table[count + 1 :] == 0)
    capacity = bank.capacity
    for i in range(capacity - count):  # one past capacity: a growth by MAPPED_GROWTH
        layer.update_layer(f"n{i}", 16, init_weights=False)
    assert bank.capacity >= math.ceil(capacity * MAPPED_GROWTH) and bank.mapped
    assert layer.vera_lambda_b["p"] is p and p.data_ptr() == bank.lambda_b_table[bank.slot_of["p"]].data_ptr()
    torch.testing.assert_close(p.detach(), values)
    twin = copy.deepcopy(layer)
    assert not twin._bank.mapped and twin._bank.linked()
    for name in ("p", "m3", "n0"):
        torch.testing.assert_close(twin.vera_lambda_d.row(name), layer.vera_lambda_d.row(name))
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin(x, adapter_names=["m3", "n0", "p"]), layer(x, adapter_names=["m3", "n0", "p"]))


def test_state_dict_load_to_and_deepcopy_keep_the_tables_in_step():
    vm = _model()
    state = {k: v.clone() for k, v in vm.state_dict().items()}
    randomize_lambdas(vm, seed=9)
    vm.load_state_dict(state)
    assert _linked(vm)
    torch.testing.assert_close(_row(vm.model.lin1, "a1")[1], state["model.lin1.vera_lambda_b.a1"])
    vm.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    assert _linked(vm)
    vm.to(torch.float64)
    assert _linked(vm) and vm.model.lin1._bank.lambda_b_table.dtype == torch.float64
    vm.to(torch.float32)
    twin = copy.deepcopy(vm)
    assert _linked(twin)
    with torch.no_grad():
        twin.model.lin1.vera_lambda_b["a1"].add_(1.0)
    torch.testing.assert_close(_row(vm.model.lin1, "a1")[1], state["model.lin1.vera_lambda_b.a1"])


def test_indexed_batch_equals_named_batch_and_each_sample_alone():
    vm = _model()
    x = torch.randn(7, 10)
    names = ["default", "__base__", "a1", "c", "default", "a0", "c"]
    with torch.no_grad():
        stacked = vm(x, adapter_names=names)  # names, no gradient: the bank through names
    idx = vm.adapter_indices(names)
    assert idx.dtype == torch.int64 and idx.tolist()[1] == -1
    with torch.inference_mode():
        indexed = vm(x, adapter_indices=idx)
    torch.testing.assert_close(indexed, stacked)
    for i, name in enumerate(names):
        if name == "__base__":
            with vm.disable_adapter(), torch.no_grad():
                alone = vm(x[i : i + 1])
        else:
            vm.set_adapter(name)
            with torch.no_grad():
                alone = vm(x[i : i + 1])
        torch.testing.assert_close(indexed[i : i + 1], alone, msg=name)


def test_generate_with_adapter_indices_matches_names():
    vm = ours(tiny_llama(), r=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    vm.add_adapter("other", VeraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False))
    randomize_lambdas(vm, seed=11)
    ids = token_ids(batch=2, seq=5)
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    by_name = vm.generate(input_ids=ids, adapter_names=["other", "default"], **settings)
    by_index = vm.generate(input_ids=ids, adapter_indices=vm.adapter_indices(["other", "default"]), **settings)
    assert torch.equal(by_name, by_index)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda vm, x: vm.adapter_indices(["default", "nope"]), ValueError, "names: unknown adapter\\(s\\) nope"),
        (lambda vm, x: vm.adapter_indices("default"), TypeError, "names must be a list of str"),
        (lambda vm, x: vm(x, adapter_indices=[0, 1, 0]), TypeError, "adapter_indices must be the int64 tensor"),
        (lambda vm, x: vm(x, adapter_indices=torch.zeros(3)), ValueError, "1-D int64 tensor"),
        (lambda vm, x: vm(x, adapter_indices=torch.zeros(2, dtype=torch.int64)), ValueError, "got 2 and 3"),
        (
            lambda vm, x: vm(x, adapter_names=["c"] * 3, adapter_indices=torch.zeros(3, dtype=torch.int64)),
            ValueError,
            "not both",
        ),
    ],
)
def test_bad_indices_are_clear_errors(call, error, match):
    vm = _model()
    x = torch.randn(3, 10)
    before = snapshot(vm)
    with pytest.raises(error, match=match):
        call(vm, x)
    assert_unchanged(vm, before)


def test_adapter_indices_refused_with_modules_to_save():
    vm = ours(mlp(), r=6, target_modules=["lin0"], modules_to_save=["head"])
    with pytest.raises(ValueError, match="adapter_indices cannot route modules_to_save"):
        vm(torch.randn(2, 10), adapter_indices=vm.adapter_indices(["default", "__base__"]))


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), [a.device for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def _indexed_ops(extra: int):
    vm = _model(extra=extra).eval()
    x = torch.randn(4, 10)
    idx = vm.adapter_indices(["c", "__base__", "default", "a0"])
    with torch.inference_mode(), _Recorder() as rec:
        y = vm(x, adapter_indices=idx)
    return rec.ops, y


def test_indexed_path_has_no_host_sync_no_stacking_and_no_loop_over_adapters():
    few, _ = _indexed_ops(extra=2)
    many, _ = _indexed_ops(extra=30)
    names = [op for op, _ in few]
    host = ("_local_scalar_dense", "item", "tolist", "nonzero", "unique", "_to_copy", "copy_", "stack", "cat", "pad")
    assert not [n for n in names if any(h in n for h in host)], names
    assert all(d == torch.device("cpu") for _, devices in few for d in devices)
    assert sum("vera_ext." in n for n in names) == 2  # one op per VeRA layer
    assert [op for op, _ in many] == names  # the same work whatever the number of adapters registered


def test_mixed_training_still_reaches_the_parameters():
    vm = _model()
    vm.set_adapter(["default", "c"])
    x = torch.randn(3, 10)
    vm(x, adapter_names=["default", "c", "__base__"]).square().sum().backward()
    assert vm.model.lin1.vera_lambda_b["c"].grad is not None
    assert vm.model.lin0.vera_lambda_b["default"].grad is not None


# ------------------------------------------------------------------------------------------------ load_adapters


def _saved(tmp_path, vm, names):
    vm.save_pretrained(tmp_path, selected_adapters=names)
    return {n: str(tmp_path if n == "default" else tmp_path / n) for n in names}


def test_load_adapters_loads_all_equal_to_the_saved_ones(tmp_path):
    source = _model()
    dirs = _saved(tmp_path, source, ["default", "a0", "a1", "c"])
    target = ours(mlp(), r=6, target_modules=["lin0", "lin1"], adapter_name="base0")
    loaded = target.load_adapters({f"x_{n}": d for n, d in dirs.items()})
    assert loaded == ["x_default", "x_a0", "x_a1", "x_c"]
    x = torch.randn(4, 10)
    names = ["default", "a0", "a1", "c"]
    with torch.no_grad():
        want = source(x, adapter_names=names)
        got = target(x, adapter_indices=target.adapter_indices([f"x_{n}" for n in names]))
    torch.testing.assert_close(got, want)
    assert not target.model.lin0.vera_lambda_b["x_a0"].requires_grad  # (not trainable, not active)
    # a list of directories names each adapter by its last path component
    more = target.load_adapters([dirs["a0"]])
    assert more == ["a0"]


@pytest.mark.parametrize(
    "spoil, error, match",
    [
        (lambda dirs: {**dirs, "bad": "/nonexistent/adapter"}, FileNotFoundError, "does not exist"),
        (lambda dirs: {**dirs, "base0": dirs["a0"]}, ValueError, "already exists"),
        (lambda dirs: {**dirs, "__base__": dirs["a0"]}, ValueError, "reserved"),
        (lambda dirs: {**dirs, "num": 3}, TypeError, "must be a directory or a \\(config, tensors\\) pair"),
        (lambda dirs: "a/dir", TypeError, "paths_or_dict must be a dict"),
        (lambda dirs: {}, ValueError, "paths_or_dict is empty"),
        (lambda dirs: [dirs["a0"], dirs["a0"]], ValueError, "twice"),
    ],
)
def test_load_adapters_refusals_insert_nothing(tmp_path, spoil, error, match):
    dirs = _saved(tmp_path, _model(), ["a0", "a1"])
    target = ours(mlp(), r=6, target_modules=["lin0", "lin1"], adapter_name="base0")
    before = snapshot(target)
    with pytest.raises(error, match=match):
        target.load_adapters(spoil(dirs))
    assert_unchanged(target, before)
    assert list(target.peft_config) == ["base0"]


def test_load_adapters_checks_every_checkpoint_before_inserting(tmp_path):
    dirs = _saved(tmp_path, _model(), ["a0", "a1"])
    config = VeraConfig(r=6, target_modules=["lin0", "lin1"])
    tensors = {"base_model.model.lin0.vera_lambda_b": torch.zeros(20)}  # lin1 and the lambda_d missing
    target = ours(mlp(), r=6, target_modules=["lin0", "lin1"], adapter_name="base0")
    before = snapshot(target)
    with pytest.raises(ValueError, match="vera_A and vera_B .* not present.*adapter 'late' \\(in memory\\)"):
        target.load_adapters({**dirs, "late": (config, tensors)})
    assert_unchanged(target, before)
    tensors.update(
        {"base_model.vera_A": target.vera_projection.vera_A, "base_model.vera_B": target.vera_projection.vera_B}
    )
    with pytest.raises(ValueError, match="adapter 'late' \\(in memory\\).* does not fit this model .*: 3 missing key"):
        target.load_adapters({**dirs, "late": (config, tensors)})
    assert_unchanged(target, before)
    other_key = VeraConfig(r=6, target_modules=["lin0", "lin1"], projection_prng_key=5)
    with pytest.raises(ValueError, match="PRNG initialisation key must be the same"):
        target.load_adapters({**dirs, "late": (other_key, {})})
    assert_unchanged(target, before)


@pytest.mark.cuda
def test_mixed_decode_step_captures_in_a_cuda_graph_and_replays_any_mix():
    """A model-level mixed decode step (adapter_indices=, 4 rows: the ops' decode path) captured once, replayed with
    other mixes written into the same index tensor: equal to eager each time. (A model whose own code reads back to
    the host, e.g. some attention-mask paths, is not capturable whatever the adapters do: plain Linear layers here.)"""
    vm = _model().cuda().eval()
    x = torch.randn(4, 10, device="cuda")
    idx = vm.adapter_indices(["a0", "c", "default", "__base__"])
    assert idx.device.type == "cuda"
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # (warm up: the projection's casts are cached outside the capture)
            for _ in range(2):
                vm(x, adapter_indices=idx)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = vm(x, adapter_indices=idx)
        for names in (["a0", "c", "default", "__base__"], ["__base__"] * 4, ["c"] * 4, ["default", "a1", "a1", "c"]):
            idx.copy_(vm.adapter_indices(names))
            graph.replay()
            torch.testing.assert_close(y, vm(x, adapter_names=names), msg=str(names))
