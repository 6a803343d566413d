"""SyncDataParallel takes torch DDP's argument names: the same keyword arguments give DDP's
gradients on 2 gloo ranks (tests/_ddp_args_worker.py trains both side by side), ``bucket_cap_mb``
gives DDP's bucket layout, and every DDP argument it cannot honour is refused with the reason.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainpatterns import _kernels
from trainpatterns.distributed import SyncDataParallel

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_args_worker as W  # noqa: E402
from _ranks import run_ranks  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and _kernels.cuda_compiled()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp_args")
    res = run_ranks([str(Path(W.__file__)), str(tmp)], world=2, timeout_s=150)
    assert [r[0] for r in res] == [0, 0], f"workers' return codes and stderr: {[(r[0], r[2][-3000:]) for r in res]}"
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


def _assert_same(ddp: dict, ours: dict, what: str) -> None:
    assert ddp.keys() == ours.keys(), what
    for n, a in ddp.items():
        b = ours[n]
        assert (a is None) == (b is None), f"{what} {n}: DDP's is {'None' if a is None else 'a tensor'}, ours is not"
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=f"{what} {n}")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("scenario", list(W.SCENARIOS))
def test_the_same_ddp_keywords_give_ddps_gradients(ranks, scenario):
    # Each rank trains one model under DDP(**kwargs) and a copy under SyncDataParallel(**kwargs):
    # every step's gradients (None where DDP's is None: the branch on odd steps, the unused
    # layer), the parameters after SGD and the buffers must be DDP's, element by element.
    for rank in range(2):
        run = ranks[rank][scenario]
        for step, (g_ddp, g_ours) in enumerate(zip(run["ddp"]["grads"], run["ours"]["grads"])):
            _assert_same(g_ddp, g_ours, f"rank {rank} step {step} gradient of")
        _assert_same(run["ddp"]["params"], run["ours"]["params"], f"rank {rank} parameter")
        _assert_same(run["ddp"]["buffers"], run["ours"]["buffers"], f"rank {rank} buffer")
        assert run["ours"]["grads"][-1]["never.weight"] is None and run["ours"]["grads"][0]["branch.weight"] is not None
    r0, r1 = (ranks[r][scenario]["ours"] for r in range(2))
    # What each scenario is about: rank-local buffers (broadcast_buffers=False: not even at wrap
    # time), rank-local weights (init_sync=False; buffers still broadcast before each forward),
    # buffers synced once, at wrap time (forward_sync_buffers=False).
    buffers_differ = not torch.equal(r0["buffers"]["shift"], r1["buffers"]["shift"])
    assert buffers_differ == (scenario == "ddp_kwargs")
    params_differ = not torch.equal(r0["params"]["inp.weight"], r1["params"]["inp.weight"])
    assert params_differ == (scenario == "no_init_sync")


@pytest.mark.timeout(200)
def test_bucket_cap_mb_gives_ddps_bucket_layout(ranks):
    # DDP given bucket_cap_mb caps its first bucket there too (not at its 1 MiB default): with a
    # 3 MiB cap, DDP's buckets (rebuilt in the order gradients arrive) are one bucket of everything.
    for rank in range(2):
        layout = ranks[rank]["layout"]
        assert layout["ours"] == layout["ddp"] and len(layout["ddp"]) == 1, layout


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_bucket_cap_mb_is_bucket_mb_with_the_first_bucket_capped_there_too():
    big = nn.Sequential(*[nn.Linear(512, 512) for _ in range(3)], nn.Linear(512, 10))
    ddp_named = SyncDataParallel(big, bucket_cap_mb=3).bucket_params
    assert ddp_named == SyncDataParallel(big, bucket_mb=3, first_bucket_mb=3).bucket_params
    assert len(ddp_named) == 1
    assert len(SyncDataParallel(big, bucket_mb=3).bucket_params) == 2  # ours: 1 MiB first bucket
    assert SyncDataParallel(big, bucket_cap_mb=3, first_bucket_mb=1).bucket_params == \
        SyncDataParallel(big, bucket_mb=3).bucket_params
    assert SyncDataParallel(big, bucket_mb=3, bucket_cap_mb=3).bucket_mb == 3.0
    with pytest.raises(ValueError, match="bucket_mb=2 and bucket_cap_mb=3 name one setting"):
        SyncDataParallel(big, bucket_mb=2, bucket_cap_mb=3)
    with pytest.raises(ValueError, match="must be a number of MiB > 0"):
        SyncDataParallel(big, bucket_cap_mb=0)


@pytest.mark.parametrize("name,value,reason", [
    ("static_graph", True, "no static-graph mode.*use_reentrant=False"),
    ("gradient_as_bucket_view", False, "always views into the buckets"),
    ("mixed_precision", object(), "compress='bf16'"),
    ("device_mesh", object(), "process_group="),
    ("delay_all_reduce_named_params", [("0.weight", None)], "freeze one"),
    ("skip_all_reduce_unused_params", True, "travel as zeros"),
    ("bucket_cap_mb_list", [1, 2], "first_bucket_mb= and bucket_mb="),
    ("dim", 1, "one process drives one device"),
    ("check_reduction", True, "deprecated"),
])
def test_a_ddp_argument_it_cannot_honour_says_why(name, value, reason):
    with pytest.raises(ValueError, match=f"cannot honour DDP's {name}=.*{reason}"):
        SyncDataParallel(_model(), **{name: value})


def test_unknown_and_malformed_arguments():
    with pytest.raises(TypeError, match="unexpected keyword argument 'bucket_size'"):
        SyncDataParallel(_model(), bucket_size=3)
    with pytest.raises(ValueError, match="find_unused_parameters must be one of"):
        SyncDataParallel(_model(), find_unused_parameters="yes")
    with pytest.raises(ValueError, match="broadcast_buffers and forward_sync_buffers name one setting"):
        SyncDataParallel(_model(), broadcast_buffers=True, forward_sync_buffers=False)


def test_ddp_arguments_at_values_that_mean_what_it_does_give_plain_gradients():
    # Every DDP argument at a value that asks for nothing SyncDataParallel does not do anyway.
    model = _model()
    plain = _model()
    ddp = SyncDataParallel(model, bucket_cap_mb=25, find_unused_parameters=True, gradient_as_bucket_view=True,
                           broadcast_buffers=False, init_sync=True, static_graph=False, dim=0, check_reduction=False,
                           delay_all_reduce_named_params=None, param_to_hook_all_reduce=None, mixed_precision=None,
                           device_mesh=None, skip_all_reduce_unused_params=False, bucket_cap_mb_list=None,
                           batched_grad_copy=True, device_ids=[torch.device("cpu")], output_device="cpu")
    for x in (torch.randn(4, 5), torch.randn(3, 5)):
        ddp(x).square().sum().backward()
        plain(x).square().sum().backward()
        for (n, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)


def test_device_ids_and_output_device_must_be_the_modules_device():
    with pytest.raises(ValueError, match=r"device_ids=\[0\], but the module is on cpu.*never moves the module"):
        SyncDataParallel(_model(), device_ids=[0])
    with pytest.raises(ValueError, match=r"device_ids=\['cpu', 'cpu'\].*one process drives one device"):
        SyncDataParallel(_model(), device_ids=["cpu", "cpu"])
    with pytest.raises(TypeError, match="device_ids must be None or a list of one device"):
        SyncDataParallel(_model(), device_ids=0)
    with pytest.raises(ValueError, match="output_device=1, but the module is on cpu"):
        SyncDataParallel(_model(), output_device=1)
    with pytest.raises(ValueError, match="device_ids: 'gpu7' is not a device"):
        SyncDataParallel(_model(), device_ids=["gpu7"])


def test_inputs_are_moved_through_tuples_lists_and_dicts():
    from trainpatterns.distributed.sync import _moved

    Pair = collections.namedtuple("Pair", "a b")
    t = torch.randn(3)
    dd = collections.defaultdict(list, {"x": t})
    moved = _moved((t, [t, {"k": t}], Pair(t, 2), dd, "s"), torch.device("meta"))
    assert moved[0].is_meta and moved[1][0].is_meta and moved[1][1]["k"].is_meta
    assert type(moved[2]) is Pair and moved[2].a.is_meta and moved[2].b == 2
    assert type(moved[3]) is collections.defaultdict and moved[3].default_factory is list and moved[3]["x"].is_meta
    assert moved[4] == "s" and not t.is_meta and dd["x"] is t


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_device_ids_moves_cpu_inputs_to_the_module_device_as_ddp_does():
    model = _model().cuda()
    plain = _model().cuda()
    ddp = SyncDataParallel(model, device_ids=[0], output_device=torch.device("cuda", 0))
    x = torch.randn(4, 5)
    y = ddp(x)
    assert y.is_cuda
    y.square().sum().backward()
    plain(x.cuda()).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
