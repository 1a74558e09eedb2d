"""Data-parallel runs on PyTorch's own distributed engine: launch, communication, data shards.

Nothing here is used, and nothing changes, when a run is not distributed: ``communicator()``
returns None for a single process, and every caller keeps its single-process code path then.

Under ``torchrun`` every process (rank) runs the same program. The probe objective stays the mean
over the GLOBAL list of probe batches: each rank evaluates the batches i with
``i % world_size == rank`` and the sums of loss, gradient, Hessian-vector product and
finite-difference gradient are all-reduced explicitly (DDP's gradient hooks do not fire under
``torch.autograd.grad``). All-reduce hands every rank the same result, so every rank runs the
same eigen-solver on the same vectors and takes the same decisions; what depends on a clock (the
overhead budget, when one is given) is decided on rank 0 and broadcast.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Launch:
    """This process's place in a ``torchrun`` launch, from the environment torchrun sets."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_launch() -> Launch | None:
    """The launch when torchrun (or another launcher that sets WORLD_SIZE, RANK and LOCAL_RANK)
    started this process; None otherwise."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return Launch(
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError:
        return None


def launch_device(launch: Launch, name: str) -> torch.device:
    """The device of this rank: ``auto`` and ``cuda`` mean cuda:LOCAL_RANK (the CPU without
    CUDA for ``auto``); an explicit ``cuda:N`` or ``cpu`` is taken as given."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", launch.local_rank)
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Communicator]:
    """Join the default process group (nccl for CUDA devices, gloo otherwise), yield its
    communicator, and leave the group on exit."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    try:
        comm = Communicator(None, dist.get_rank(), dist.get_world_size(), backend)
        yield comm
        comm.barrier()  # every rank done before any tears the group down (else gloo may abort)
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Communicator:
    """Collectives over one process group (None: the default group) of ``world_size`` ranks."""

    group: Any
    rank: int
    world_size: int
    backend: str

    @property
    def device(self) -> torch.device:
        """Where small tensors for collectives live: the current GPU for nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; every rank gets the same result."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def sum_floats(self, *values: float) -> list[float]:
        """Sums over the ranks of a few numbers, in float64."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return [float(v) for v in self.all_reduce_sum(tensor).cpu()]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        dist.barrier(group=self.group)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank: all ranks agree."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return bool(tensor.item() > 0)

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        holder = [value]
        dist.broadcast_object_list(holder, src=self._global_rank0(), group=self.group)
        return holder[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def _global_rank0(self) -> int:
        if self.group is None:
            return 0
        return dist.get_global_rank(self.group, 0)


def communicator(process_group: Any = None) -> Communicator | None:
    """The communicator of an initialized process group (None: the default one), or None when
    torch.distributed is not initialized or the group has a single rank."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    world_size = dist.get_world_size(process_group)
    if world_size <= 1:
        return None
    return Communicator(
        process_group,
        dist.get_rank(process_group),
        world_size,
        str(dist.get_backend(process_group)),
    )


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """The module inside a DistributedDataParallel wrapper and the wrapper's process group;
    any other module and None."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model.process_group
    return model, None


def local_indices(count: int, comm: Communicator | None) -> list[int]:
    """The global batch indices this rank evaluates: i with i % world_size == rank."""
    if comm is None:
        return list(range(count))
    return list(range(comm.rank, count, comm.world_size))


def shard_dataloader(loader: Any, comm: Communicator, *, seed: int) -> Any:
    """This rank's share of the training data.

    A ``torch.utils.data.DataLoader`` over a map-style dataset with a plain sequential or random
    sampler is rebuilt with a ``DistributedSampler`` (shuffled as the original, seeded with the
    run's seed, ``set_epoch`` at every pass: see ``ShardedLoader``); every other iterable is
    strided: batch i of each pass goes to rank i % world_size.
    """
    from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
    from torch.utils.data.distributed import DistributedSampler

    if (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and loader.batch_size is not None
        and type(loader.sampler) in (RandomSampler, SequentialSampler)
    ):
        sampler = DistributedSampler(
            loader.dataset,
            num_replicas=comm.world_size,
            rank=comm.rank,
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=seed,
            drop_last=loader.drop_last,
        )
        rebuilt = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=loader.generator,
            prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
        )
        return ShardedLoader(rebuilt, comm, sampler=sampler)
    return ShardedLoader(loader, comm, seed=seed)


class ShardedLoader:
    """One rank's share of a dataloader, iterated again for every pass over the data.

    With a ``DistributedSampler`` each pass calls ``set_epoch(pass)`` (so the shuffle differs per
    pass and agrees across ranks). Otherwise every rank iterates the whole loader and keeps the
    batches i with i % world_size == rank; the loader then draws from random number generators
    of its own, seeded alike on every rank, so a shuffling loader orders its batches the same way
    on every rank whatever the model's dropout draws in between.
    """

    def __init__(
        self,
        loader: Iterable[Any],
        comm: Communicator,
        *,
        sampler: Any = None,
        seed: int = 0,
    ) -> None:
        self.loader = loader
        self.comm = comm
        self.sampler = sampler
        self.epoch = 0
        self._rng: tuple[Any, Any, Any] | None = None
        if sampler is None:
            with _swapped_rng(None) as state:
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)
                random.seed(seed)
                self._rng = state.capture()

    def __iter__(self) -> Iterator[Any]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            yield from self.loader
            return
        iterator: Iterator[Any] | None = None
        index = 0
        while True:
            with _swapped_rng(self._rng) as state:
                try:
                    if iterator is None:
                        iterator = iter(self.loader)
                    batch = next(iterator)
                except StopIteration:
                    return
                finally:
                    self._rng = state.capture()
            if index % self.comm.world_size == self.comm.rank:
                yield batch
            index += 1


class _RngState:
    @staticmethod
    def capture() -> tuple[Any, Any, Any]:
        return torch.get_rng_state(), np.random.get_state(), random.getstate()


@contextlib.contextmanager
def _swapped_rng(state: tuple[Any, Any, Any] | None) -> Iterator[_RngState]:
    """Run the block on the CPU random generators set to ``state`` (as they are, for None);
    the global states are restored on exit."""
    saved = _RngState.capture()
    if state is not None:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])
    try:
        yield _RngState()
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])
