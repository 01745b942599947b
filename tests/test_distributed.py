"""Multi-process training with LinearWithLoRA: DDP and FSDP2 on two CPU processes (gloo).

Each test spawns two ranks that build the same model from the same seed (three Linear layers
through ``replace_linear_with_lora``, base frozen, B random so the LoRA path matters), train it a
few SGD steps on their half of a global batch, and save what they end with. The parent trains the
same model in one process on the whole batch and compares: DDP averages the ranks' gradients of
their per-rank mean losses, which is the gradient of the full-batch mean, so the LoRA weights must
agree to fp32 rounding (only the order of the sums over tokens differs).

The same runs also save the adapters with ``save_adapter``: from the DDP wrapper (the names must
be the plain model's) and from the FSDP2-sharded model (every rank gathers, rank 0 writes full
tensors), and the FSDP2 ranks load that file into a fresh sharded model; the parent loads the files
into plain models. The FSDP2 ranks also merge and unmerge one sharded layer in place (DTensor
arithmetic on each rank's shard), and see ``merge_and_unload`` refused.

Ranks talk over 127.0.0.1 only (a port picked by binding to port 0, gloo on the loopback
interface); process groups time out after 60 s and the parent waits at most DEADLINE seconds, so a
failing or stuck worker fails the test instead of hanging it.
"""

import os
import socket
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as W  # noqa: E402

from lora_kernels import LinearWithLoRA, load_adapter, lora_state_dict  # noqa: E402
from lora_kernels.reference import lora_linear_reference  # noqa: E402

WORLD = 2
DEADLINE = 120  # seconds for a whole spawn: start-up, training, and the 60 s group timeout
RTOL, ATOL = 1e-5, 1e-6  # fp32: only the order of the sums differs from the single process

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_ifname():
    """The loopback interface's name ('lo' on Linux, 'lo0' on macOS), for GLOO_SOCKET_IFNAME."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (AttributeError, OSError):
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _spawn(mode, out_dir):
    """Run ``_dist_worker.worker`` on WORLD processes; return each rank's saved results."""
    ctx = mp.spawn(W.worker, args=(WORLD, _free_port(), mode, str(out_dir), _loopback_ifname()),
                   nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{mode} workers did not finish within {DEADLINE} s")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # a worker raised or died: its traceback is in the message
        errs = "".join(p.read_text() for p in sorted(out_dir.glob("rank*.err")))
        # A rank killed by a signal once every rank had written its results: gloo's teardown (its
        # threads at destroy_process_group or exit; std::terminate, SIGABRT, seen once in CI, not
        # on the package's path). The results are whole (written before the closing barrier), so
        # they are checked as usual; anything else fails.
        if not (isinstance(e, mp.ProcessExitedException) and e.signal_name and not errs
                and all((out_dir / f"rank{r}.pt").exists() for r in range(WORLD))):
            pytest.fail(f"{mode} worker failed:\n{e}\n{errs}", pytrace=False)
        warnings.warn(f"{mode}: {e} after every rank wrote its results (gloo's teardown); checking them")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(5)
        # (torch leaves a failed rank's error file in the temporary folder for good)
        for f in ctx.error_files:
            if f:
                Path(f).unlink(missing_ok=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _single_process():
    model = W.build_model()
    x, y = W.make_data()
    with torch.no_grad():
        forward = model(x)
    losses = W.train(model, x, y)
    return model, forward, losses, W.plain_state(model)


def _lora_names(state):
    names = [n for n in state if n.endswith(("lora.A", "lora.B"))]
    assert len(names) == 6, names
    return names


def _check_training(results, label):
    model, _, ref_losses, ref = _single_process()
    start = W.plain_state(W.build_model())
    worst = 0.0
    for rank, res in enumerate(results):
        state = res["state"]
        assert set(state) == set(ref), (label, rank, sorted(state), sorted(ref))
        for name in _lora_names(ref):
            # The steps moved the adapter, so agreeing with the baseline is not agreeing on nothing.
            assert (ref[name] - start[name]).abs().max() > 1e-3, name
            torch.testing.assert_close(state[name], ref[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=name, r=rank: f"{label} rank {r} {n}: {m}")
            worst = max(worst, (state[name] - ref[name]).abs().max().item())
        for name in set(ref) - set(_lora_names(ref)):  # the frozen base never moves
            torch.testing.assert_close(state[name], start[name], rtol=0, atol=0)
    # Each rank's loss is its half's mean; their average is the full batch's mean loss.
    for step, ref_loss in enumerate(ref_losses):
        mean = sum(res["losses"][step] for res in results) / WORLD
        torch.testing.assert_close(mean, ref_loss, rtol=RTOL, atol=ATOL)
    # Largest |distributed - single process| over the LoRA weights, shown with -rA or on failure.
    print(f"{label}: max |diff| vs single process over LoRA params = {worst:.3e}")
    return worst


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp")


@pytest.fixture(scope="module")
def ddp_results(ddp_dir):
    return _spawn("ddp", ddp_dir)


def test_ddp_training_matches_single_process(ddp_results):
    _check_training(ddp_results, "DDP")
    for res in ddp_results:  # the fused call in every layer: the forward, then each step's
        assert res["fused_calls"] == 3 * (1 + W.STEPS), res["fused_calls"]


def test_ddp_forward_matches(ddp_results):
    """The fused layer's output under DDP is the single-process model's on that rank's half, and
    the seed's unfused formula layer by layer."""
    model = W.build_model()
    x, _ = W.make_data()
    with torch.no_grad():
        full = model(x)
        h = x
        for m in model:
            if isinstance(m, LinearWithLoRA):
                h = lora_linear_reference(h, m.linear.weight, m.linear.bias, m.lora.A, m.lora.B,
                                          m.lora.alpha)
            else:
                h = m(h)
    torch.testing.assert_close(full, h, rtol=RTOL, atol=ATOL)
    for rank, res in enumerate(ddp_results):
        torch.testing.assert_close(res["forward"], W.shard(full, rank, WORLD), rtol=RTOL, atol=ATOL)


def test_ddp_adapter_saved_from_wrapper(ddp_results, ddp_dir):
    """save_adapter on the DDP wrapper writes the plain model's names: a plain model loads it."""
    plain = W.build_model(seed=5)
    load_adapter(plain, ddp_dir / "ddp_adapter.pt")
    trained = ddp_results[0]["state"]
    for name, value in lora_state_dict(plain).items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0)


@pytest.fixture(scope="module")
def fsdp2_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp2")


@pytest.fixture(scope="module")
def fsdp2_results(fsdp2_dir):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    except ImportError as e:
        pytest.skip(f"FSDP2 (torch.distributed.fsdp.fully_shard) is not in torch {torch.__version__}: {e}")
    return _spawn("fsdp2", fsdp2_dir)


def test_fsdp2_training_matches_single_process(fsdp2_results):
    for res in fsdp2_results:  # every parameter really was sharded, and gathered for plain fused calls
        assert set(res["param_types"].values()) == {"DTensor"}, res["param_types"]
        # three layers a step, then the merge check's two forwards: three fused, then two (one merged)
        assert res["fused_calls"] == 3 * W.STEPS + 3 + 2, res["fused_calls"]
    _check_training(fsdp2_results, "FSDP2")


def test_fsdp2_layer_merges_and_unmerges(fsdp2_results):
    """merge() on a sharded layer folds the update into every rank's shard: the same output, the
    same (unmerged) state dict, and unmerge() gives the weights back to fp32 rounding."""
    for res in fsdp2_results:
        assert res["merged_weight_type"] == "DTensor"
        state = {k: v.double() for k, v in res["state"].items()}
        expected = state["0.linear.weight"] + W.ALPHA * (state["0.lora.A"] @ state["0.lora.B"]).t()
        torch.testing.assert_close(res["merged_weight"].double(), expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(res["merged_out"], res["unmerged_out"], rtol=RTOL, atol=ATOL)
        for name, t in res["state"].items():
            torch.testing.assert_close(res["merged_state"][name], t, rtol=RTOL, atol=ATOL, msg=name)
            torch.testing.assert_close(res["state_before_unload"][name], t, rtol=RTOL, atol=ATOL, msg=name)


def test_fsdp2_merge_and_unload_is_refused_by_name_and_changes_nothing(fsdp2_results):
    """Unloaded, an FSDP2 unit's linear would hold shards with nothing to gather them (its next
    call failed inside F.linear, naming no cause): refused, before any weight is written."""
    for res in fsdp2_results:
        assert res["unload"].startswith("merge_and_unload cannot unload FSDP-sharded layers"), res["unload"]
        assert sum("LinearWithLoRA" in name for name in res["layers_after_unload"]) == 3
        for name, t in res["state_before_unload"].items():
            assert torch.equal(res["state_after_unload"][name], t), name


@pytest.mark.parametrize("ext", ["safetensors", "pt"])
def test_fsdp2_save_load_adapter(fsdp2_results, fsdp2_dir, ext):
    """save_adapter from the sharded model writes the full adapters, which load into a plain model
    and (in the worker) into a fresh sharded one, equal to the one-process training's."""
    if ext == "safetensors":
        pytest.importorskip("safetensors")
    _, _, _, ref = _single_process()
    plain = W.build_model(seed=5)  # its own random B, so loading nothing would fail
    load_adapter(plain, fsdp2_dir / f"fsdp2_adapter.{ext}")
    loaded = lora_state_dict(plain)
    assert set(loaded) == set(_lora_names(ref))
    for name, value in loaded.items():
        assert type(value) is torch.Tensor  # noqa: E721 (a plain tensor, not a DTensor)
        torch.testing.assert_close(value, ref[name], rtol=RTOL, atol=ATOL)
        # The training run's adapters, exactly: nothing was lost between the shards and the file.
        torch.testing.assert_close(value, fsdp2_results[0]["state"][name], rtol=0, atol=0)
    for rank, res in enumerate(fsdp2_results):  # the plain file loaded into a fresh sharded model
        assert set(res["loaded_types"].values()) == {"DTensor"}, res["loaded_types"]
        assert set(res["loaded"]) == set(loaded)
        for name, value in res["loaded"].items():
            torch.testing.assert_close(value, loaded[name], rtol=0, atol=0,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")


def test_failing_worker_fails_fast(tmp_path):
    """The harness itself: a rank that raises while the other waits in a collective fails the
    test with the worker's traceback, and the rank left waiting ends without the group timeout
    (stopped by the harness, or by its peer's closed connection, not by "Timed out waiting")."""
    with pytest.raises(pytest.fail.Exception, match="deliberate failure on rank 1"):
        _spawn("fail_on_rank1", tmp_path)
    assert (tmp_path / "rank1.err").exists()
    waiting = tmp_path / "rank0.err"
    assert not waiting.exists() or "timed out" not in waiting.read_text().lower()


def test_a_rank_killed_by_a_signal_fails_unless_every_rank_wrote_its_results(tmp_path):
    """The harness: a rank that dies by a signal before the results are written fails the test;
    one that dies after every rank wrote them (at the end, as gloo's teardown once did) leaves
    whole results, which are returned to be checked, with a warning."""
    for name in ("before", "after"):
        (tmp_path / name).mkdir()
    with pytest.raises(pytest.fail.Exception, match="(?s)abort_before_results worker failed.*SIGABRT"):
        _spawn("abort_before_results", tmp_path / "before")
    with pytest.warns(UserWarning, match="SIGABRT after every rank wrote its results"):
        results = _spawn("abort_after_results", tmp_path / "after")
    assert [r["rank"] for r in results] == list(range(WORLD))
