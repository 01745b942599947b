"""Helpers for tests/test_distributed.py: the model, the data, the training loop, and the worker
that torch.multiprocessing spawns. A module of its own (not the test file) so spawned processes
import it without importing pytest's conftest.

Every rank builds the model from the same seed, so the ranks start identical without relying on
DDP's broadcast; the parent builds the single-process baseline from the same functions.
"""

import datetime
import os
import traceback

import torch

import lora_kernels

IN, HIDDEN, OUT = 16, 32, 8
RANK, ALPHA = 4, 2.0
GLOBAL_BATCH = 16
STEPS, LR = 3, 0.1
TIMEOUT = datetime.timedelta(seconds=60)


def build_model(seed=0):
    """Three Linear layers with nonlinearities, each wrapped in LinearWithLoRA; base frozen,
    only ``lora.A``/``lora.B`` train; B random (not the zeros of the init) so LoRA matters."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, OUT),
    )
    lora_kernels.replace_linear_with_lora(model, rank=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora_kernels.LinearWithLoRA):
                m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=g) * 0.2)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora." in f".{name}")
    return model


def make_data(seed=1234):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g)
    y = torch.randn(GLOBAL_BATCH, OUT, generator=g)
    return x, y


def shard(t, rank, world):
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def train(model, x, y, steps=STEPS, lr=LR):
    """SGD on the mean-squared error, averaged over the batch it is given. Under DDP each rank
    passes its half; DDP averages the ranks' gradients, so the step is the full-batch mean's."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses


def plain_state(model):
    """Name -> full plain tensor, gathering DTensors (a collective under FSDP2: every rank calls)."""
    out = {}
    for name, t in model.state_dict().items():
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.detach().clone()
    return out


def _ddp(model, x, y, rank, world, out_dir):
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    xr, yr = shard(x, rank, world), shard(y, rank, world)
    with torch.no_grad():
        forward = ddp(xr).clone()  # the fused layer's output under DDP, before any step
    losses = train(ddp, xr, yr)
    if rank == 0:  # saved from the DDP wrapper itself: the names must not carry "module."
        lora_kernels.save_adapter(ddp, os.path.join(out_dir, "ddp_adapter.pt"))
    return {"forward": forward, "losses": losses, "state": plain_state(model)}


def _fully_shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, lora_kernels.LinearWithLoRA):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp2(model, x, y, rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    _fully_shard(model, mesh)
    sharded = {n: type(p).__name__ for n, p in model.named_parameters()}
    losses = train(model, shard(x, rank, world), shard(y, rank, world))
    # Every rank saves (a collective gather) to the same paths; rank 0 writes them.
    for ext in ("safetensors", "pt"):
        lora_kernels.save_adapter(model, os.path.join(out_dir, f"fsdp2_adapter.{ext}"))
    # A fresh sharded model (other adapter values) loads the plain file.
    fresh = _fully_shard(build_model(seed=5), mesh)
    lora_kernels.load_adapter(fresh, os.path.join(out_dir, "fsdp2_adapter.safetensors"))
    loaded = {n: t for n, t in plain_state(fresh).items() if n.endswith(("lora.A", "lora.B"))}
    state = plain_state(model)
    # One sharded layer merged and unmerged in place: DTensor arithmetic, every rank its shard.
    # Merged, the forward is the base layer's alone with the update in its weight (the same
    # output), and the state dict still holds the weight unmerged.
    with torch.no_grad():
        unmerged_out = model(x).clone()
        model[0].merge()
        merged_out = model(x).clone()
    merged_weight = model[0].linear.weight.full_tensor().detach().clone()
    merged_state = plain_state(model)
    model[0].unmerge()
    state_before_unload = plain_state(model)
    try:  # refused by name, before anything is written: unloaded, the sharded linears could not run
        lora_kernels.merge_and_unload(model)
        unload = "unloaded"
    except ValueError as e:
        unload = str(e)
    return {"losses": losses, "state": state, "param_types": sharded, "loaded": loaded,
            "loaded_types": {n: type(p).__name__ for n, p in fresh.named_parameters()},
            "unmerged_out": unmerged_out, "merged_out": merged_out, "merged_state": merged_state,
            "merged_weight": merged_weight, "state_before_unload": state_before_unload,
            "merged_weight_type": type(model[0].linear.weight).__name__,
            "unload": unload, "state_after_unload": plain_state(model),
            "layers_after_unload": [type(m).__name__ for m in model.modules()]}


def _fail_on_rank1(model, x, y, rank, world, out_dir):
    """For the harness's own test: rank 1 raises while rank 0 waits for it in a collective."""
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    import torch.distributed as dist
    dist.barrier()
    return {}


def _abort_before_results(model, x, y, rank, world, out_dir):
    """For the harness's own test: rank 0 dies by a signal before anything is written."""
    if rank == 0:
        os.abort()
    return {}


def _abort_after_results(model, x, y, rank, world, out_dir):
    """For the harness's own test: rank 0 dies by a signal once both ranks wrote their results
    (in ``worker``, after the closing barrier), as gloo's teardown once did."""
    return {"rank": rank, "abort_after_results": rank == 0}


MODES = {"ddp": _ddp, "fsdp2": _fsdp2, "fail_on_rank1": _fail_on_rank1,
         "abort_before_results": _abort_before_results, "abort_after_results": _abort_after_results}


def _count_fused_calls():
    """A list that grows by one per fused call of a LinearWithLoRA: the unfused path (taken for
    hooks or tensor-subclass weights) gives the same numbers, so only this tells them apart."""
    calls = []
    fused = lora_kernels.modules.lora_linear

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)
    lora_kernels.modules.lora_linear = counted
    return calls


def worker(rank, world, port, mode, out_dir, ifname):
    """Entry point of each spawned process: run ``mode`` and save its results to
    ``out_dir/rank{rank}.pt``. Any exception propagates, so the process exits non-zero and
    torch.multiprocessing reports it (with this traceback) to the parent."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # two ranks on a two-core machine
    if ifname:  # keep gloo's own connections on the loopback interface
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        model = build_model()
        x, y = make_data()
        fused_calls = _count_fused_calls()
        try:
            result = MODES[mode](model, x, y, rank, world, out_dir)
            result["fused_calls"] = len(fused_calls)
        except Exception:
            # Tell the parent what failed even if the other rank is left waiting in a collective.
            with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
                f.write(traceback.format_exc())
            raise
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        if result.get("abort_after_results"):
            os.abort()
    finally:
        dist.destroy_process_group()
