"""Data parallelism on torch.distributed's own engines (``torchrun`` / ``accelerate launch``; gloo on
CPU, nccl on CUDA).

Every process draws the same contexts and uniforms and samples its slice of the global batch
(:meth:`Group.shard`: contiguous, sizes differing by at most one; sampling is by inverse CDF from
per-row uniforms, so the samples are those of one process). The per-sample vectors are all-gathered
with tensor collectives (:meth:`Group.gather`, :meth:`Group.gather_texts`), so that Ẑ, the baselines
and the metrics are computed on the global batch, identically on every rank. The gradient of each
rank's part of the surrogate −Σ coefficient·log πθ / N_global is summed over ranks by the engine that
``trainer.parallel`` names (:func:`data_parallel`):

- ``ddp``: :class:`torch.nn.parallel.DistributedDataParallel` — every rank holds the whole model and
  its optimiser state; gradients are all-reduced in buckets while the backward runs.
- ``fsdp``: FSDP2 (:func:`torch.distributed.fsdp.fully_shard` over a 1-D ``DeviceMesh``): each
  decoder layer (the model's ``_no_split_modules``) and the rest of the model are sharded, so
  parameters, gradients and optimiser state take 1/world of their size on each rank. Passes without
  gradient (sampling, scoring) gather the parameters once for the pass and free them after, so a
  rank that stops decoding earlier never waits in a collective; passes with gradient gather one layer
  at a time and reduce-scatter the gradients.

Both run every pass of the policy through one root module (:class:`PolicyPasses`), where the engines
hook in. The result equals one process with the same global batch and seed, up to the order of
floating-point sums. Without a process group (one process) the policy runs unwrapped and every method
here is the identity.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..config import Parallel

__all__ = ["Group", "process_group", "PolicyPasses", "DataParallelPasses", "data_parallel", "whole",
           "shard_like"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class Group:
    """This process's place in the data-parallel group (rank 0 of 1 without one)."""

    def __init__(self):
        dist = _dist()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
        # nccl moves CUDA tensors only; gloo CPU tensors
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if dist and dist.get_backend() == "nccl" else torch.device("cpu")

    def shard(self, n: int) -> slice:
        """This process's contiguous slice of a global batch of n (sizes differ by at most one)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation in rank order of each process's tensor along dim 0 (lengths may differ)."""
        dist = _dist()
        if dist is None:
            return x
        local = x.detach().to(self.device)
        if local.dtype == torch.bool:
            local = local.to(torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(local)], dtype=torch.int64, device=self.device))
        sizes = [int(s) for s in sizes]
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[:len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(device=x.device, dtype=x.dtype)

    def gather_texts(self, texts: list[str]) -> list[str]:
        """Concatenation in rank order of each process's strings (sent as UTF-8 bytes)."""
        if _dist() is None:
            return list(texts)
        encoded = [t.encode("utf-8") for t in texts]
        lengths = self.gather(torch.tensor([len(b) for b in encoded], dtype=torch.int64))
        data = self.gather(torch.tensor(list(b"".join(encoded)), dtype=torch.uint8))
        raw, out, at = bytes(data.numpy()), [], 0
        for n in lengths.tolist():
            out.append(raw[at:at + n].decode("utf-8"))
            at += n
        return out

    def sum(self, value: float) -> float:
        """Sum of a number over ranks."""
        dist = _dist()
        if dist is None:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total)


def process_group() -> Group:
    """Initialise the process group when launched by torchrun/accelerate (WORLD_SIZE > 1) and return
    this process's :class:`Group`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _dist() is None:
        import torch.distributed as dist

        # env:// (RANK, WORLD_SIZE, MASTER_ADDR/PORT as torchrun and accelerate launch set them); one GPU
        # per process (LOCAL_RANK) with nccl where CUDA is visible, gloo on the CPU
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        store, rank, world = next(dist.rendezvous("env://"))
        # torchrun --max-restarts keeps its store across restarts: without a prefix per attempt a restarted
        # group would read the dead group's gloo addresses and fail to connect
        store = dist.PrefixStore(f"fdiv_align/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo", store=store,
                                rank=rank, world_size=world)
    return Group()


def whole(obj):
    """``obj`` (a tensor, or dicts/lists/tuples of them) with every tensor on the CPU and every FSDP-sharded
    DTensor replaced by the whole tensor (all-gathered: every rank must call, in the same order)."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map

    def one(x):
        if isinstance(x, DTensor):
            return x.full_tensor().detach().cpu()
        return x.detach().cpu() if isinstance(x, torch.Tensor) else x

    return tree_map(one, obj)


def shard_like(value, param: torch.Tensor):
    """A whole tensor ``value`` (from :func:`whole`) placed as ``param`` is: sharded the same way when
    ``param`` is an FSDP DTensor of ``value``'s shape, else unchanged."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor) \
            and tuple(value.shape) == tuple(param.shape):
        return distribute_tensor(value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements)
    return value


class PolicyPasses(torch.nn.Module):
    """The root module of a data-parallel policy: ``forward(run, *args)`` returns ``run(*args)``, so that
    the engine's hooks (DDP's gradient reducer, FSDP's gathers) see every pass of ``model`` (and of the
    frozen ``reference`` copy of full fine-tuning)."""

    def __init__(self, model: torch.nn.Module, reference: torch.nn.Module | None = None):
        super().__init__()
        self.model, self.reference = model, reference

    def forward(self, run, *args, **kwargs):
        return run(*args, **kwargs)


class DataParallelPasses:
    """How a :class:`~fdiv_align.lm.policy.Policy` runs its passes under ``mode`` (see the module
    docstring): the callable the policy hands each pass to, and the gradient synchronisation of a
    step's micro-batches (:meth:`micro_batches`)."""

    def __init__(self, module: torch.nn.Module, mode: str, world: int):
        self.module, self.mode = module, mode
        #: both engines average gradients over ranks; each rank's surrogate is its part of a sum, so the
        #: trainer multiplies it by the world size before the backward
        self.loss_scale = float(world)
        self._fsdp_modules = [m for m in module.modules() if _is_fsdp(m)] if mode == "fsdp" else []

    def __call__(self, run, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.module(run, *args, **kwargs)
        if self.mode == "ddp":  # a no-grad pass needs no collective: every rank holds the whole model
            return run(*args, **kwargs)
        with self._gathered():
            return self.module(run, *args, **kwargs)

    @contextlib.contextmanager
    def _gathered(self):
        """FSDP: every parameter gathered at its first use in the pass and kept until the pass ends."""
        for m in self._fsdp_modules:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in self._fsdp_modules:
                m.reshard()
                m.set_reshard_after_forward(m is not self.module, recurse=False)  # the root keeps FSDP's default

    def micro_batches(self, count: int):
        """Yield ``count`` micro-batch indices; the gradients are synchronised after the last one only."""
        for i in range(count):
            last = i == count - 1
            if self.mode == "ddp":
                with contextlib.nullcontext() if last else self.module.no_sync():
                    yield i
            else:
                self.module.set_requires_gradient_sync(last)
                yield i


def _is_fsdp(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _layer_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the decoder layers: transformers' ``_no_split_modules`` (accelerate's FSDP wrap unit)."""
    for m in model.modules():
        names = getattr(m, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def data_parallel(policy, mode: str, group: Group) -> DataParallelPasses | None:
    """Wrap ``policy``'s model (and reference) for ``mode`` in ``group``; None for one process. After
    FSDP the policy's ``trainable`` parameters are the sharded ones (build the optimiser after this)."""
    if group.world == 1:
        return None
    mode = Parallel(mode)  # the config's choice: another value is refused there, naming the valid ones
    root = PolicyPasses(policy.model, policy.reference)
    if mode == "ddp":
        device_ids = [group.device.index] if group.device.type == "cuda" else None
        # no buffer sync in forward: the ranks' pass counts may differ, and the models' buffers (rotary
        # frequencies) never change
        module = torch.nn.parallel.DistributedDataParallel(root, device_ids=device_ids, forward_sync_buffers=False)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(group.device.type, (group.world,))
        layers = _layer_classes(policy.model)
        if not layers:
            raise ValueError(f"trainer.parallel=fsdp: {type(policy.model).__name__} names no decoder layer class "
                             "(transformers' _no_split_modules); use trainer.parallel=ddp")
        for m in list(root.modules()):
            if type(m).__name__ in layers:
                fully_shard(m, mesh=mesh)
        module = fully_shard(root, mesh=mesh)
        policy.trainable = {n: p for n, p in policy.model.named_parameters() if p.requires_grad}
    return DataParallelPasses(module, mode, group.world)
