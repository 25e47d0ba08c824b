"""Distributed balancing: the work plan, and 2-process gloo runs (DDP, FSDP2) on CPU.

The multi-process tests run this file as a worker script (``--worker``) in two processes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tempbalance.analysis import AnalysisOptions, analyze_layers
from tempbalance.distributed import assign_layers, distributed_analyze_layers, layer_cost
from tempbalance.layers import MatrixOptions, find_layers
from tests.helpers.workers import free_port, run_workers

WORLD = 2
WORKER_TIMEOUT_S = 240


# ---------------------------------------------------------------- models shared by parent and workers


@pytest.fixture(autouse=True)
def _one_thread_like_the_workers():
    """Single-process references use one thread, as each worker does: BLAS sums in another
    order with another thread count, which changes float32 spectra in the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resnet(num_classes: int = 10, seed: int = 0) -> nn.Module:
    from tempbalance.train.models import create_model

    torch.manual_seed(seed)
    return create_model("resnet18", num_classes, width=0.25)


def _odd_model(seed: int = 2) -> nn.Module:
    """Rows that do not split evenly over 2 ranks (33 -> 17 + 16, 1 -> 1 + 0, 5 -> 3 + 2)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 33), nn.ReLU(), nn.Linear(33, 1), nn.Conv2d(3, 5, 3))


def _broken_model(seed: int = 3) -> nn.Module:
    """Linear layers, two with non-finite weights, built so that rank 1 owns the NaN one."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(64, 90), nn.Linear(48, 40), nn.Linear(30, 30))
    with torch.no_grad():
        model[1].weight[3, 5] = float("nan")
        model[3].weight[0, 0] = float("inf")
    return model


def _digits_model(seed: int = 4) -> nn.Module:
    from tempbalance.train.models import create_model

    torch.manual_seed(seed)
    return create_model("cnn-digits", 10, in_channels=1)


# ---------------------------------------------------------------- helpers


def _same(a, b) -> bool:
    """Equality that treats NaN as equal to NaN (and compares containers element-wise)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _assert_records_equal(got: list[dict], want: list[dict], label: str) -> None:
    assert [r["name"] for r in got] == [r["name"] for r in want], label
    for g, w in zip(got, want):
        for key in w:
            assert _same(g[key], w[key]), f"{label}: layer {w['name']} field {key}: {g[key]!r} != {w[key]!r}"


def _run_workers(outdir: Path) -> list[dict]:
    """Run this file as ``WORLD`` gloo worker processes; return each rank's saved results."""
    return run_workers(__file__, outdir, WORLD, WORKER_TIMEOUT_S, extra_env={"MASTER_PORT": str(free_port())})


def _plan(refs, options=None) -> list[int]:
    return assign_layers([layer_cost(ref, options) for ref in refs], WORLD)


def _reference_records(model: nn.Module, options: AnalysisOptions | None = None) -> list[dict]:
    return [r.to_dict(with_eigenvalues=True) for r in analyze_layers(find_layers(model), options)]


# ---------------------------------------------------------------- the plan (in process)


def _optimal_makespan(costs: list[float], world: int) -> float:
    return min(
        max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(world))
        for owners in itertools.product(range(world), repeat=len(costs))
    )


@pytest.mark.parametrize("seed", range(25))
def test_assign_layers_is_a_good_deterministic_partition(seed):
    rng = random.Random(seed)
    world = rng.randint(1, 4)
    costs = [float(rng.choice([0, 1, 2, 3, 5, 8, 13, 100])) * rng.random() for _ in range(rng.randint(0, 7))]
    owners = assign_layers(costs, world)
    assert owners == assign_layers(list(costs), world)  # deterministic
    assert len(owners) == len(costs) and all(0 <= o < world for o in owners)  # exactly one owner each
    if costs:
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        optimal = _optimal_makespan(costs, world)
        assert max(loads) <= optimal + max(costs) + 1e-9
        assert max(loads) <= 4 / 3 * optimal + 1e-9  # Graham's bound for longest-first


def test_assign_layers_longest_first_on_least_loaded_rank():
    # By hand: 10 -> r0; 9 -> r1; 5 -> r1 (9 < 10); 4 -> r0 (10 < 14); 1, 1 ties -> lower index to r0 (14 = 14).
    assert assign_layers([1, 10, 4, 9, 5, 1], 2) == [0, 0, 0, 1, 1, 1]
    assert assign_layers([3, 3, 3], 2) == [0, 1, 0]  # equal costs: index order, then lowest rank
    assert assign_layers([7, 1], 5) == [0, 1]
    assert assign_layers([], 3) == []


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_assign_layers_rejects_bad_world_size(bad):
    with pytest.raises(ValueError, match="world_size"):
        assign_layers([1.0], bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_assign_layers_rejects_bad_costs(bad):
    with pytest.raises(ValueError, match=r"costs\[1\]"):
        assign_layers([1.0, bad], 2)


def test_layer_cost_from_shapes():
    conv = nn.Conv2d(16, 24, (3, 5), bias=False)
    lin = nn.Linear(40, 7)
    refs = {r.name: r for r in find_layers(nn.Sequential(conv, lin))}
    # per position: 15 matrices 24 x 16; flattened: one 24 x 240 matrix; linear: 7 x 40.
    assert layer_cost(refs["0"]) == 15 * 24 * 16 * 16
    assert layer_cost(refs["0"], MatrixOptions(conv_mode="flatten")) == 24 * 240 * 24
    assert layer_cost(refs["0"], AnalysisOptions(conv_mode="flatten")) == 24 * 240 * 24
    assert layer_cost(refs["1"]) == 7 * 40 * 7


def test_layer_cost_of_a_split_qkv_projection():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(12, 3)})
    costs = {r.name: layer_cost(r) for r in find_layers(model, split_qkv=True)}
    # q/k/v: 12 rows each of the fused 36 x 12 weight; out_proj: 12 x 12.
    assert costs == {"attn.q": 12**3, "attn.k": 12**3, "attn.v": 12**3, "attn.out_proj": 12**3}


def test_without_process_group_it_is_analyze_layers():
    refs = find_layers(_odd_model())
    options = AnalysisOptions(keep_eigenvalues=True)
    got = [r.to_dict(with_eigenvalues=True) for r in distributed_analyze_layers(refs, options)]
    want = [r.to_dict(with_eigenvalues=True) for r in analyze_layers(refs, options)]
    _assert_records_equal(got, want, "no process group")


def test_every_record_field_is_shared_or_known_locally():
    """A field added to LayerRecord must be shared by the collective (or be layer metadata)."""
    from dataclasses import fields

    import tempbalance.distributed as distributed
    from tempbalance.analysis import LayerRecord

    local = {"name", "kind", "shape", "matrix_shape", "num_matrices", "frozen", "tied_names", "reason", "eigenvalues"}
    assert {f.name for f in fields(LayerRecord)} == local | set(distributed._SHARED_FIELDS)


# ---------------------------------------------------------------- 2 processes, gloo, DDP


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """One 2-process run for all the scenarios below (process start-up dominates the time)."""
    return _run_workers(tmp_path_factory.mktemp("workers"))


@pytest.fixture(scope="module")
def ddp_results(worker_results):
    return [res["ddp"] for res in worker_results]


@pytest.mark.slow
def test_ranks_agree_with_each_other_and_with_one_process(ddp_results):
    want = _reference_records(_resnet())
    for rank, res in enumerate(ddp_results):
        _assert_records_equal(res["resnet"], want, f"rank {rank} vs single process")
    assert all("eigenvalues" not in r for r in ddp_results[0]["resnet"])  # not kept by default


@pytest.mark.slow
def test_each_rank_measures_only_its_share(ddp_results):
    refs = find_layers(_resnet())
    owners = _plan(refs)
    costs = [layer_cost(r) for r in refs]
    for rank, res in enumerate(ddp_results):
        expected = [ref.name for ref, o in zip(refs, owners) if o == rank]
        assert res["measured"] == expected
        solved = sum(r["num_matrices"] for r, o in zip(res["resnet"], owners) if o == rank)
        assert res["matrices_solved"] == solved  # no other eigen work on this rank
        share = sum(c for c, o in zip(costs, owners) if o == rank) / sum(costs)
        assert 0.4 < share < 0.6, f"rank {rank} has {share:.2%} of the cost"


@pytest.mark.slow
def test_nan_failures_and_eigenvalues_travel_to_every_rank(ddp_results):
    refs = find_layers(_broken_model())
    assert _plan(refs)[1] == 1, "test set-up: the NaN layer should be owned by rank 1"
    want = _reference_records(_broken_model(), AnalysisOptions(keep_eigenvalues=True))
    assert want[1]["reason"] and want[3]["reason"] and math.isnan(want[1]["alpha"])
    for rank, res in enumerate(ddp_results):
        _assert_records_equal(res["broken"], want, f"rank {rank} (NaN / inf weights, keep_eigenvalues)")
        assert res["broken"][0]["eigenvalues"] == want[0]["eigenvalues"]


@pytest.mark.slow
def test_ddp_training_with_balanced_rates_ends_identical(ddp_results):
    a, b = ddp_results[0]["train"], ddp_results[1]["train"]
    assert len(a["lrs"]) >= 2
    assert a["lrs"] == b["lrs"]
    assert _same(a["alphas"], b["alphas"])
    spread = [max(lrs) - min(lrs) for lrs in a["lrs"]]
    assert max(spread) > 0, "balancing should give the layers different rates"
    # Parameters only: BatchNorm running statistics are per-rank buffers under DDP (each rank
    # updates them from its own batch; DDP re-broadcasts rank 0's at the next forward).
    assert a["params"].keys() == b["params"].keys() and len(a["params"]) > 0
    for key in a["params"]:
        assert torch.equal(a["params"][key], b["params"][key]), f"{key} differs between ranks"
    start = dict(_digits_model().named_parameters())
    assert all(not torch.equal(start[k], a["params"][k]) for k in start), "the weights should have moved"


@pytest.mark.slow
def test_tempbalance_rates_agree_across_ranks_and_with_one_process(ddp_results):
    model = _resnet()
    import tempbalance

    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    single = tempbalance.TempBalance(model, opt)
    single.rebalance()
    for rank, res in enumerate(ddp_results):
        got = res["tempbalance"]
        assert got["factors"] == single.factors, f"rank {rank}"
        assert got["lrs"] == [g["lr"] for g in opt.param_groups], f"rank {rank}"
        assert got["measured"] < len(find_layers(model)), "the scheduler should split the work"


@pytest.mark.slow
def test_split_qkv_parts_are_split_across_ranks(ddp_results):
    import tempbalance

    model = _qkv_model()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    single = tempbalance.TempBalance(model, opt, split_qkv=True)
    parts = [ref.name for ref in single.plan.refs]
    assert parts == ["1.1", "1.qkv.q", "1.qkv.k", "1.qkv.v", "2.1", "2.qkv.q", "2.qkv.k", "2.qkv.v"]
    measured = [res["tempbalance_qkv"]["measured"] for res in ddp_results]
    assert sorted(measured[0] + measured[1]) == sorted(parts) and measured[0] and measured[1]
    for res in ddp_results:
        assert res["tempbalance_qkv"]["factors"] == single.factors
        assert res["tempbalance_qkv"]["metric"] == [x.metric for x in single.history[-1].layers]


# ---------------------------------------------------------------- 2 processes, gloo, FSDP2


@pytest.fixture(scope="module")
def fsdp_results(worker_results):
    results = [res["fsdp"] for res in worker_results]
    if "skip" in results[0]:
        reason = results[0]["skip"]
        pytest.skip(f"FSDP2 fully_shard on CPU with gloo does not work with torch {torch.__version__}: {reason}")
    return results


@pytest.mark.slow
def test_fsdp2_records_equal_one_process(fsdp_results):
    want = {"resnet": _reference_records(_resnet(5, seed=1)), "odd": _reference_records(_odd_model())}
    for rank, res in enumerate(fsdp_results):
        assert res["sharded"], "the weights should be DTensors after fully_shard"
        for key in want:
            _assert_records_equal(res[key], want[key], f"FSDP2 {key} rank {rank}")


@pytest.mark.slow
def test_fsdp2_full_matrices_only_on_their_owner(fsdp_results):
    refs = find_layers(_resnet(5, seed=1)) + find_layers(_odd_model())
    owners = _plan(find_layers(_resnet(5, seed=1))) + _plan(find_layers(_odd_model()))
    for rank, res in enumerate(fsdp_results):
        expected = [ref.name for ref, o in zip(refs, owners) if o == rank]
        assert res["measured"] == expected
        assert res["max_layers_per_call"] == 1  # one full layer at a time
        assert res["received"] == len(expected)  # gathers this rank received
        assert res["sent"] == len(refs)  # every rank sends its block of every layer
        assert res["full_tensor_calls"] == 0  # never the all-ranks all-gather


@pytest.mark.slow
def test_unsupported_dtensor_layouts_fail_clearly_on_every_rank(fsdp_results):
    for res in fsdp_results:
        partial, two_dims = res["unsupported"]
        assert "Partial" in partial and "accepted: Shard(dim) on at most one mesh dimension" in partial
        assert "sharded on 2 mesh dimensions" in two_dims


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(WORLD, 1), (1, WORLD)])
def test_hsdp_records_equal_one_process(fsdp_results, shape):
    want = _reference_records(_odd_model())
    for rank, res in enumerate(fsdp_results):
        assert all("Replicate" in p and "Shard(dim=0)" in p for p in res[f"hsdp{shape}_placements"])
        _assert_records_equal(res[f"hsdp{shape}"], want, f"HSDP mesh {shape} rank {rank}")


@pytest.mark.slow
def test_fsdp2_tempbalance_rates_equal_one_process(fsdp_results):
    import tempbalance

    model = _resnet(5, seed=1)
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    single = tempbalance.TempBalance(model, opt)
    single.rebalance()
    for rank, res in enumerate(fsdp_results):
        assert res["tempbalance"]["factors"] == single.factors, f"rank {rank}"
        assert res["tempbalance"]["lrs"] == [g["lr"] for g in opt.param_groups], f"rank {rank}"
        assert res["tempbalance_full_tensor_calls"] == 0


# ---------------------------------------------------------------- worker side


def _measure_tracker():
    """Record which layers this rank measured and how many matrices it solved."""
    import tempbalance.distributed as distributed

    log = {"measured": [], "matrices_solved": 0, "max_layers_per_call": 0}
    real_analyze, real_eigvalsh = distributed.analyze_layers, torch.linalg.eigvalsh

    def analyze(refs, options=None, progress=None):
        log["measured"] += [r.name for r in refs]
        log["max_layers_per_call"] = max(log["max_layers_per_call"], len(refs))
        return real_analyze(refs, options, progress)

    def eigvalsh(matrices, *args, **kwargs):
        log["matrices_solved"] += matrices.shape[0] if matrices.dim() == 3 else 1
        return real_eigvalsh(matrices, *args, **kwargs)

    distributed.analyze_layers = analyze
    torch.linalg.eigvalsh = eigvalsh
    return log


def _dicts(records) -> list[dict]:
    return [r.to_dict(with_eigenvalues=True) for r in records]


def _linear_factors(alphas: list[float]) -> list[float]:
    """The published linear map 0.5..1.5 over min..max alpha (1.0 when they are all equal)."""
    lo, hi = min(alphas), max(alphas)
    return [1.0 if hi == lo else 0.5 + (a - lo) / (hi - lo) for a in alphas]


def _train_ddp(rank: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _digits_model()
    ddp = DDP(model)
    refs = find_layers(ddp)
    balanced = refs[1:-1]
    groups = [{"params": [p for p in r.module.parameters()], "name": r.name} for r in balanced]
    taken = {id(p) for g in groups for p in g["params"]}
    groups.append({"params": [p for p in model.parameters() if id(p) not in taken], "name": "rest"})
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    lrs, alphas = [], []
    for step in range(6):
        if step % 2 == 0:
            records = distributed_analyze_layers(balanced, AnalysisOptions())
            alphas.append([r.alpha for r in records])
            for group, factor in zip(opt.param_groups, _linear_factors(alphas[-1])):
                group["lr"] = 0.05 * factor
            lrs.append([g["lr"] for g in opt.param_groups])
        x = torch.randn(16, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    dist.barrier()
    return {"lrs": lrs, "alphas": alphas, "params": {k: v.detach().clone() for k, v in model.named_parameters()}}


def _tempbalance_run(model: nn.Module) -> dict:
    """One TempBalance rebalance of ``model`` (the scheduler measures through the distributed call)."""
    import tempbalance

    log = _measure_tracker()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    tb = tempbalance.TempBalance(model, opt)
    before = len(log["measured"])
    tb.rebalance()
    return {"factors": dict(tb.factors), "lrs": [g["lr"] for g in opt.param_groups],
            "measured": len(log["measured"]) - before}


def _qkv_model(seed: int = 6) -> nn.Module:
    """Two blocks with a fused q/k/v Linear each (measured as three parts with split_qkv)."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(64, 192), nn.Linear(64, 64)) for _ in range(2)]
    model = nn.Sequential(nn.Linear(16, 64), *blocks, nn.Linear(64, 10))
    for block in blocks:
        block.qkv = block[0]  # the fused-projection name rule
        del block._modules["0"]
    return model


def _tempbalance_qkv_run() -> dict:
    import tempbalance

    log = _measure_tracker()
    model = _qkv_model()
    opt = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
    tb = tempbalance.TempBalance(model, opt, split_qkv=True, warmup=1)
    tb.rebalance()
    return {"factors": dict(tb.factors), "metric": [x.metric for x in tb.history[-1].layers],
            "measured": list(log["measured"])}


def _worker_ddp(rank: int) -> dict:
    log = _measure_tracker()
    out = {"resnet": _dicts(distributed_analyze_layers(find_layers(_resnet())))}
    out.update(measured=list(log["measured"]), matrices_solved=log["matrices_solved"])
    broken = find_layers(_broken_model())
    out["broken"] = _dicts(distributed_analyze_layers(broken, AnalysisOptions(keep_eigenvalues=True)))
    out["train"] = _train_ddp(rank)
    out["tempbalance"] = _tempbalance_run(_resnet())
    out["tempbalance_qkv"] = _tempbalance_qkv_run()
    return out


def _worker_fsdp(rank: int) -> dict:
    import torch.distributed as dist

    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        mesh = init_device_mesh("cpu", (WORLD,))
        resnet, odd = _resnet(5, seed=1), _odd_model()
        for child in resnet.children():
            if any(True for _ in child.parameters()):
                fully_shard(child, mesh=mesh)
        fully_shard(resnet, mesh=mesh)
        fully_shard(odd, mesh=mesh)
    except Exception as exc:  # reported as the skip reason
        return {"skip": f"{type(exc).__name__}: {exc}"}
    calls = {"full_tensor_calls": 0, "sent": 0, "received": 0}
    real_full, real_gather = DTensor.full_tensor, dist.gather

    def full_tensor(self, *args, **kwargs):
        calls["full_tensor_calls"] += 1
        return real_full(self, *args, **kwargs)

    def gather(tensor, gather_list=None, *args, **kwargs):
        calls["sent"] += 1
        calls["received"] += gather_list is not None
        return real_gather(tensor, gather_list, *args, **kwargs)

    DTensor.full_tensor, dist.gather = full_tensor, gather
    log = _measure_tracker()
    out = {"sharded": all(isinstance(r.weight, DTensor) for r in find_layers(resnet) + find_layers(odd))}
    out["resnet"] = _dicts(distributed_analyze_layers(find_layers(resnet)))
    out["odd"] = _dicts(distributed_analyze_layers(find_layers(odd)))
    out.update(calls, measured=list(log["measured"]), max_layers_per_call=log["max_layers_per_call"])
    for shape in ((WORLD, 1), (1, WORLD)):  # HSDP: (replicate, shard) meshes; Replicate() + Shard(0) placements
        hsdp = _odd_model()
        fully_shard(hsdp, mesh=init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard")))
        out[f"hsdp{shape}"] = _dicts(distributed_analyze_layers(find_layers(hsdp)))
        out[f"hsdp{shape}_placements"] = [str(r.weight.placements) for r in find_layers(hsdp)]
    out["unsupported"] = _unsupported_placement_errors(mesh)
    out["tempbalance"] = _tempbalance_run(resnet)
    out["tempbalance_full_tensor_calls"] = calls["full_tensor_calls"] - out["full_tensor_calls"]
    return out


def _unsupported_placement_errors(mesh) -> list[str]:
    """The error texts for weights in layouts the gather does not handle (raised on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard

    ref = find_layers(nn.Linear(6, 8))[0]
    local = torch.randn(4, 3)
    layouts = [
        DTensor.from_local(local, mesh, [Partial()]),
        DTensor.from_local(local, init_device_mesh("cpu", (1, WORLD)), [Shard(0), Shard(1)]),
    ]
    errors = []
    for weight in layouts:
        try:
            distributed_analyze_layers([dataclasses.replace(ref, weight=weight)])
        except NotImplementedError as exc:
            errors.append(str(exc))
    return errors


def _worker_main(outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        out = {"ddp": _worker_ddp(rank), "fsdp": _worker_fsdp(rank)}
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker_main(sys.argv[2])
