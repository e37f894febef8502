"""Synchronized BatchNorm across processes: gloo on CPU (processes spawned by the tests), NCCL when GPUs exist.

Each spawned rank builds the same full batch from a seed, runs its slice through the synchronized layer and checks
itself against single-process native BatchNorm + activation on the whole batch (float64), so one spawn covers
every strategy.  Batch sizes differ per rank; one rank of the 3-process group has an empty batch.
"""
from __future__ import annotations

import datetime
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ckptnorm import STRATEGY_NAMES, PrecisionFallbackWarning
from ckptnorm.torch import (
    BatchNormAct1d,
    BatchNormAct2d,
    SyncBatchNormAct1d,
    SyncBatchNormAct2d,
    SyncBatchNormAct3d,
    SyncBatchNormError,
    SyncFallbackWarning,
    batch_norm_act,
    convert,
    convert_sync,
)

STRATEGIES = ["standard", "checkpoint", "efficient_checkpoint", "inplace_abn"]
# (strategy, activation, param, layout, residual, dims): every strategy in both layouts, residual sites, 1-D inputs.
CASES = [(strategy, act, param, layout, False, 4)
         for strategy, act, param in [("standard", "silu", None), ("checkpoint", "elu", 1.0),
                                      ("efficient_checkpoint", "relu", None), ("inplace_abn", "leaky_relu", 0.1)]
         for layout in ("nchw", "channels_last")]
CASES += [("inplace_abn", "elu", 1.0, "channels_last", False, 4),  # its keep decision reads the merged range of x
          ("inplace_abn", "leaky_relu", 0.1, "nchw", True, 4),  # ... and the merged range of the residual
          ("checkpoint", "leaky_relu", 0.1, "channels_last", True, 4),
          ("efficient_checkpoint", "elu", 1.0, "nchw", False, 2)]
SIZES = {2: (3, 2), 3: (2, 0, 3)}
CHANNELS = 4
# per-channel offsets and spreads: |mean| >> std on channel 1 checks that the merge is exact, not sum-of-squares
OFFSET = torch.tensor([0.0, 1.0e3, -5.0, 0.5], dtype=torch.float64)
SPREAD = torch.tensor([1.0, 1.0e-2, 3.0, 0.5], dtype=torch.float64)
TOL = {"rtol": 1e-9, "atol": 1e-9}


# -- process management ---------------------------------------------------------------------------------------------
def _init(rank, world, store, timeout_s, backend="gloo"):
    import numba
    numba.set_num_threads(1)  # ranks share 2 cores: no oversubscription
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _run_ranks(fn, world, tmp_path, *args, deadline=90.0):
    """Spawn ``world`` ranks running ``fn(rank, world, store, *args)``; a rank's exception fails the test, and ranks
    still running after ``deadline`` seconds are killed (never a hung test)."""
    ctx = mp.start_processes(fn, args=(world, str(tmp_path / "store"), *args), nprocs=world, join=False,
                             start_method="spawn")
    end = time.monotonic() + deadline
    while not ctx.join(timeout=1.0):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"ranks still running after {deadline} s")


def _batch(case, total, seed=0):
    strategy, act, param, layout, residual, dims = case
    gen = torch.Generator().manual_seed(seed)
    shape = (total, CHANNELS, 3, 5) if dims == 4 else (total, CHANNELS)
    view = (1, CHANNELS, 1, 1) if dims == 4 else (1, CHANNELS)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * SPREAD.view(view) + OFFSET.view(view)
    r = torch.randn(shape, generator=gen, dtype=torch.float64) if residual else None
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
        r = None if r is None else r.contiguous(memory_format=torch.channels_last)
    return x, r, g


def _params(seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(CHANNELS, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.rand(CHANNELS, generator=gen, dtype=torch.float64) - 0.5
    return weight, bias


def _native_act(y, act, param):
    if act == "elu":
        return F.elu(y, param)
    if act == "leaky_relu":
        return F.leaky_relu(y, param)
    return {"silu": F.silu, "relu": F.relu}[act](y)


def _loss(z, g):
    # z * z keeps z for backward: checkpoint and efficient_checkpoint then re-materialize it from a recipe
    return (z * g).sum() + 0.5 * (z * z).sum()


def _reference(case, x, r, g):
    """Single-process native BatchNorm + activation on the whole batch: output, running stats, gradients."""
    _, act, param, _, residual, _ = case
    weight, bias = (p.clone().requires_grad_() for p in _params())
    rm, rv = torch.zeros(CHANNELS, dtype=torch.float64), torch.ones(CHANNELS, dtype=torch.float64)
    x = x.clone().requires_grad_()
    r = None if r is None else r.clone().requires_grad_()
    y = F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5)
    z = _native_act(y if r is None else y + r, act, param)
    _loss(z, g).backward()
    z_eval = _native_act(F.batch_norm(x.detach(), rm, rv, weight, bias, False, 0.1, 1e-5)
                         + (0 if r is None else r.detach()), act, param)
    return {"z": z.detach(), "rm": rm, "rv": rv, "dx": x.grad, "dr": None if r is None else r.grad,
            "dw": weight.grad, "db": bias.grad, "z_eval": z_eval}


def _compile_kernels(cases):
    """Run ``cases`` here, unsynchronized, in training and eval mode: this compiles the kernels that the ranks use into
    Numba's disk cache, where the ranks find them.  Otherwise, on a cold cache, every rank compiles all of them at
    once on shared cores, which takes longer than the ranks' deadline (over 90 s seen on 2 cores)."""
    for strategy, act, param, layout, residual, dims in cases:
        x, r, g = _batch((strategy, act, param, layout, residual, dims), 4)
        cls = BatchNormAct2d if dims == 4 else BatchNormAct1d
        layer = cls(CHANNELS, strategy=strategy, activation=act, activation_param=param, dtype=torch.float64)
        x.requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionFallbackWarning)
            _loss(layer(x, r) if residual else layer(x), g).backward()
            with torch.no_grad():
                layer.eval()(x, r) if residual else layer.eval()(x)


def _equivalence_rank(rank, world, store, device="cpu", backend="gloo"):
    _init(rank, world, store, 30, backend)
    for case in CASES:
        _check_case(case, rank, SIZES[world], device)
    if world == 3:
        # A process group of ranks 0 and 2 (rank 1 stays out: a layer exchanging over the default group would wait
        # for it until the timeout): the statistics are those of these two ranks' batches.
        group = dist.new_group([0, 2])
        if rank != 1:
            _check_case(CASES[7], 0 if rank == 0 else 1, (3, 2), device, group)
    dist.barrier()
    dist.destroy_process_group()  # a clean exit is about a second faster


def _check_case(case, rank, sizes, device, group=None):
    """Rank ``rank`` of the processes whose batch sizes are ``sizes`` runs ``case`` on its slice of the batch and
    compares with native BatchNorm on the whole batch."""
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    strategy, act, param, layout, residual, dims = case
    where = f"rank {rank}, case {case}"
    x, r, g = _batch(case, sum(sizes))
    ref = _reference(case, x, r, g)
    cls = SyncBatchNormAct2d if dims == 4 else SyncBatchNormAct1d
    layer = cls(CHANNELS, strategy=strategy, activation=act, activation_param=param, process_group=group,
                dtype=torch.float64, device=device)
    with torch.no_grad():
        layer.weight.copy_(_params()[0])
        layer.bias.copy_(_params()[1])
    xs = x[lo:hi].to(device).requires_grad_()
    rs = None if r is None else r[lo:hi].to(device).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionFallbackWarning)  # keeping x too is fine here
        z = layer(xs, rs) if residual else layer(xs)
    _loss(z, g[lo:hi].to(device)).backward()
    if layout == "channels_last" and dims == 4 and hi > lo:
        assert z.is_contiguous(memory_format=torch.channels_last), where
    # dweight, dbias: each rank's share of the whole batch's gradient (DDP sums them)
    grads = torch.stack([layer.weight.grad, layer.bias.grad])
    dist.all_reduce(grads, group=group)
    got = {"z": z, "rm": layer.running_mean, "rv": layer.running_var, "dx": xs.grad,
           "dr": None if rs is None else rs.grad, "dw": grads[0], "db": grads[1]}
    for key, value in got.items():
        want = ref[key]
        if key in ("z", "dx", "dr") and want is not None:
            want = want[lo:hi]
        if want is None:
            assert value is None, (where, key)
            continue
        torch.testing.assert_close(value.detach().cpu(), want, **TOL, msg=lambda m: f"{where}, {key}: {m}")
    assert int(layer.num_batches_tracked) == 1, where
    # Eval mode does not communicate: rank 0 alone runs it (a collective would time out).
    if rank == 0:
        layer.eval()
        with torch.no_grad():
            z_eval = layer(xs, rs) if residual else layer(xs)
        torch.testing.assert_close(z_eval.cpu(), ref["z_eval"][lo:hi], **TOL)
    dist.barrier(group=group)


@pytest.mark.serial  # spawns a process group
@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 3])
def test_every_strategy_matches_single_process_batchnorm(world, tmp_path):
    _compile_kernels(CASES)
    _run_ranks(_equivalence_rank, world, tmp_path)


def _group_of_one_rank(rank, world, store):
    """A process group of one: the exchanges run (gather and all-reduce over one rank) and must change nothing;
    SyncBatchNormAct3d on 5-D input, every strategy, against nn.BatchNorm3d + leaky_relu in float64."""
    _init(rank, world, store, 30)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, CHANNELS, 3, 4, 5, generator=gen, dtype=torch.float64) * 2 + 1
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    bn = nn.BatchNorm3d(CHANNELS, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(_params()[0]), bn.bias.copy_(_params()[1])
    x_ref = x.clone().requires_grad_()
    _loss(F.leaky_relu(bn(x_ref), 0.1), g).backward()
    for strategy in STRATEGY_NAMES:
        layer = SyncBatchNormAct3d(CHANNELS, strategy=strategy, activation="leaky_relu", activation_param=0.1,
                                   dtype=torch.float64)
        layer.load_state_dict({k: v for k, v in bn.state_dict().items() if k in ("weight", "bias")}, strict=False)
        xs = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no local-statistics fallback warning: the group is used
            z = layer(xs)
        _loss(z, g).backward()
        torch.testing.assert_close(xs.grad, x_ref.grad, **TOL, msg=strategy)
        torch.testing.assert_close(layer.weight.grad, bn.weight.grad, **TOL, msg=strategy)
        torch.testing.assert_close(layer.running_var, bn.running_var, **TOL, msg=strategy)
    dist.destroy_process_group()


@pytest.mark.serial  # spawns a process group
@pytest.mark.timeout(120)
def test_group_of_one_and_sync_3d_layer(tmp_path):
    _run_ranks(_group_of_one_rank, 1, tmp_path)


# -- DDP ------------------------------------------------------------------------------------------------------------
DDP_SIZES = (3, 5)
# "11" (the BatchNorm1d) stays a plain BN site and is synchronized as such
DDP_PLAN = {"1": "inplace_abn", "4": "checkpoint", "7": "efficient_checkpoint", "11": None}


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.1),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()


def _ddp_batch():
    gen = torch.Generator().manual_seed(5)
    total = sum(DDP_SIZES)
    x = torch.randn(total, 3, 6, 6, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 3, (total,), generator=gen)


def _ddp_rank(rank, world, store):
    _init(rank, world, store, 30)
    x, target = _ddp_batch()
    total = len(x)
    # single-process step on the whole batch, plain PyTorch
    ref = _net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    F.cross_entropy(ref(x), target, reduction="sum").div(total).backward()
    opt.step()
    # the same step split over the ranks
    model = convert(_net(), DDP_PLAN, sync=True)
    assert isinstance(model.get_submodule("11"), SyncBatchNormAct1d)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    lo, hi = sum(DDP_SIZES[:rank]), sum(DDP_SIZES[:rank + 1])
    # DDP averages gradients over ranks: scale each rank's sum so that the average is the whole batch's mean
    F.cross_entropy(ddp(x[lo:hi]), target[lo:hi], reduction="sum").mul(world / total).backward()
    opt.step()
    got, want = model.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-10, msg=lambda m: f"{key}: {m}")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.serial  # spawns a process group
@pytest.mark.timeout(120)
def test_ddp_training_step_matches_single_process(tmp_path):
    # the same step in this process first, unsynchronized: see _compile_kernels
    x, target = _ddp_batch()
    F.cross_entropy(convert(_net(), DDP_PLAN)(x), target).backward()
    _run_ranks(_ddp_rank, 2, tmp_path)


# -- failures: a rank that exits or stalls ends the others with a ckptnorm error, within the group's timeout ----------
FAIL_TIMEOUT_S = 2    # the group under test: a failure must surface within this + 5 s
SETUP_TIMEOUT_S = 60  # everything else: ranks start seconds apart on a loaded 2-core machine


def _failing_rank(rank, world, store, how):
    _init(rank, world, store, SETUP_TIMEOUT_S)
    # Kernels compiled (or loaded from the cache) before anything is timed: a rank still compiling while the other
    # waits would look like the stall under test.
    warm = BatchNormAct2d(CHANNELS, strategy="efficient_checkpoint")
    warm(torch.randn(2, CHANNELS, 3, 3, requires_grad=True)).sum().backward()
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=FAIL_TIMEOUT_S))
    dist.barrier()  # both ranks ready (default group, long timeout): only what follows is under test
    layer = SyncBatchNormAct2d(CHANNELS, strategy="efficient_checkpoint", process_group=group)
    x = torch.randn(2, CHANNELS, 3, 3, requires_grad=True)
    if rank == 1:
        if how == "exit_before_backward":
            layer(x)  # then the process exits without taking part in the backward exchange
        else:
            time.sleep(FAIL_TIMEOUT_S + 2)  # "stall": alive, but never calls the layer
        os._exit(0)
    z = layer(x) if how == "exit_before_backward" else None
    start = time.monotonic()
    with pytest.raises(SyncBatchNormError) as info:
        if z is None:
            layer(x)
        else:
            z.sum().backward()
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert message.startswith("ckptnorm: synchronized BatchNorm could not"), message
    assert "; tip: " in message, message
    assert elapsed < FAIL_TIMEOUT_S + 5, f"the error took {elapsed:.1f} s"
    # A process group whose collective failed may abort in its destructors at interpreter exit: leave at once.
    os._exit(0)


@pytest.mark.serial  # spawns a process group
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["exit_before_backward", "stall"])
def test_dead_or_stalled_rank_raises_ckptnorm_error(how, tmp_path):
    _run_ranks(_failing_rank, 2, tmp_path, how)


# -- without torch.distributed --------------------------------------------------------------------------------------
def test_falls_back_to_local_batchnorm_with_one_warning():
    assert not dist.is_initialized()
    x = torch.randn(4, 3, 5, 5)
    layer, local = SyncBatchNormAct2d(3, strategy="inplace_abn"), BatchNormAct2d(3, strategy="inplace_abn")
    with pytest.warns(SyncFallbackWarning, match=r"^ckptnorm: SyncBatchNormAct2d runs in training without .*tip:") \
            as record:
        z = layer(x)
    assert record[0].filename == __file__  # the line that called the layer, not torch's Module.__call__
    torch.testing.assert_close(z, local(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per module
        layer.eval()(x)  # eval mode never synchronizes: nothing to warn about
    local(x)
    torch.testing.assert_close(layer.running_mean, local.running_mean)
    torch.testing.assert_close(layer.running_var, local.running_var)


def test_sync_modules_are_drop_ins():
    for cls, plain in ((SyncBatchNormAct1d, nn.BatchNorm1d), (SyncBatchNormAct2d, nn.BatchNorm2d),
                       (SyncBatchNormAct3d, nn.BatchNorm3d)):
        layer = cls(5, 1e-3, 0.2, True, True, None, activation="elu", activation_param=0.5, strategy="checkpoint")
        assert layer.process_group is None and (layer.eps, layer.momentum) == (1e-3, 0.2)
        layer.load_state_dict(plain(5).state_dict(), strict=True)
        assert list(layer.state_dict()) == list(nn.SyncBatchNorm(5).state_dict())


def test_convert_sync_replaces_every_batchnorm_and_keeps_the_original():
    inner = BatchNormAct2d(4, strategy="inplace_abn", activation="elu", activation_param=0.5)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), inner, nn.Sequential(nn.BatchNorm2d(4), nn.ReLU()), inner)
    with torch.no_grad():
        inner.running_mean.fill_(0.25)
    synced = convert_sync(model)
    assert type(model[1]) is BatchNormAct2d and type(model[2][0]) is nn.BatchNorm2d  # untouched
    assert type(synced[1]) is SyncBatchNormAct2d and synced[1] is synced[3]  # one shared layer stays one
    assert (synced[1].strategy, synced[1].activation, synced[1].activation_param) == ("inplace_abn", "elu", 0.5)
    assert type(synced[2][0]) is SyncBatchNormAct2d
    assert (synced[2][0].strategy, synced[2][0].activation) == ("standard", "identity")
    assert list(synced.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(synced[1].running_mean, inner.running_mean)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(synced.eval()(x), model.eval()(x))
    assert type(convert_sync(nn.BatchNorm1d(3))) is SyncBatchNormAct1d


def test_convert_sync_option():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4))
    out = convert(model, "inplace_abn", sync=True)
    layers = [m for m in out.modules() if isinstance(m, SyncBatchNormAct2d)]
    assert [(m.strategy, m.activation) for m in layers] == [("inplace_abn", "leaky_relu"), ("inplace_abn", "identity")]
    plain = convert(model, "inplace_abn")
    assert not any(isinstance(m, SyncBatchNormAct2d) for m in plain.modules())
    with pytest.raises(ValueError, match="^ckptnorm: process_group is only used with sync=True.*tip:"):
        convert(model, "inplace_abn", process_group=object())


def test_merged_statistics_are_exact_for_a_large_mean():
    """The merge the reducer does (three processes simulated): mean / std = 1e9, unequal counts, an empty part.

    Each part's mean carries a rounding error of about eps * |mean|, so the merged variance is exact up to about
    eps * |mean| / std relative (1e-7 here); a sum-of-squares merge would lose everything (eps * (mean / std)^2)."""
    from ckptnorm.torch.sync import ProcessGroupReducer

    parts = [torch.randn(n, dtype=torch.float64) * 1e-3 + 1e6 for n in (7, 0, 3)]
    whole = torch.cat(parts)
    table = torch.stack([torch.cat([torch.tensor([float(len(p))]),
                                    torch.tensor([p.mean() if len(p) else 0.0, p.var(unbiased=False) * len(p)
                                                  if len(p) else 0.0])]) for p in parts])

    class Fake(ProcessGroupReducer):
        def __init__(self):
            self.group, self.world_size = None, len(parts)

        def _run(self, what, collective, gathered, local, wait_on_host):
            for out, row in zip(gathered, table):
                out.copy_(row)

    count, mean, var, _ = Fake().merge_stats(7, torch.zeros(1), torch.zeros(1))
    assert count == len(whole)
    torch.testing.assert_close(mean, whole.mean().view(1), rtol=1e-15, atol=0)
    torch.testing.assert_close(var, whole.var(unbiased=False).view(1), rtol=1e-6, atol=0)


# -- NCCL (needs GPUs) ----------------------------------------------------------------------------------------------
def _nccl_ok(gpus):
    return dist.is_nccl_available() and torch.cuda.is_available() and torch.cuda.device_count() >= gpus


def _nccl_one_gpu(rank, world, store):
    _init(rank, world, store, 30, "nccl")
    from ckptnorm.torch import ProcessGroupReducer
    case = ("standard", "leaky_relu", 0.1, "channels_last", False, 4)  # an activation every strategy takes
    x, _, g = _batch(case, 6)
    ref = _reference(case, x, None, g)
    weight, bias = (p.cuda().requires_grad_() for p in _params())
    for strategy in STRATEGIES:
        xs = x.cuda().requires_grad_()
        rm, rv = torch.zeros(CHANNELS, dtype=torch.float64, device="cuda"), torch.ones_like(ref["rv"]).cuda()
        # a one-process group: the module would not communicate, so the reducer is passed explicitly
        z = batch_norm_act(xs, rm, rv, weight, bias, True, 0.1, 1e-5, "leaky_relu", 0.1, strategy,
                           reducer=ProcessGroupReducer())
        _loss(z, g.cuda()).backward()
        torch.testing.assert_close(z.detach().cpu(), ref["z"], **TOL)
        torch.testing.assert_close(xs.grad.cpu(), ref["dx"], **TOL)
        torch.testing.assert_close(rv.cpu(), ref["rv"], **TOL)
        weight.grad = bias.grad = None


@pytest.mark.serial  # spawns a process group
@pytest.mark.timeout(300)
@pytest.mark.skipif(not _nccl_ok(1), reason="needs a CUDA GPU and NCCL")
def test_nccl_reducer_on_one_gpu(tmp_path):
    _run_ranks(_nccl_one_gpu, 1, tmp_path, deadline=240)


@pytest.mark.serial  # spawns a process group
@pytest.mark.timeout(300)
@pytest.mark.skipif(not _nccl_ok(2), reason="needs 2 CUDA GPUs and NCCL")
def test_nccl_matches_single_process(tmp_path):
    _run_ranks(_equivalence_rank, 2, tmp_path, "cuda", "nccl", deadline=240)


def test_cases_cover_every_strategy_and_an_empty_batch():
    assert {c[0] for c in CASES} == set(STRATEGIES)
    assert SIZES[3].count(0) == 1
