"""Where and how a model runs: device, backend flags, per-layer compilation, and data parallelism.

The model stays pure (torchtitan, gpt-fast): everything here is applied to a built model from the
outside, and never changes its state-dict keys. `compile_layers` compiles each encoder and decoder
layer in place (`nn.Module.compile` keeps the module and its parameters where they were); data
parallelism wraps the training objective, not the model, in DistributedDataParallel.

Processes are started by `torchrun`, which sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR /
MASTER_PORT); `init_distributed` reads them. Without them there is one process and nothing to set up.
`Rendezvous` lets a process that fails before the processes join tell the others, which would otherwise
wait for it until the process group's timeout (30 minutes).
Global torch flags are set by `configure_backends`, called when a run starts, never at import time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from tformer.config import ConfigError

# Peak dense bf16 FLOP/s by device name (../shared/BENCHMARKS.md), for MFU. PCIe before the generic H100.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12))


@dataclass(frozen=True)
class Distributed:
    """This process's place among the data-parallel processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, metrics and log lines."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """The sum over processes, in place (a no-op for one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_float(self, value: float, device: torch.device) -> float:
        """Rank 0's value on every process (a host sync: use it sparingly)."""
        return self.broadcast_floats([value], device)[0]

    def broadcast_floats(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Rank 0's values on every process, in one broadcast. Every process passes as many."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.broadcast(tensor, src=0)
        return tensor.tolist()

    def differs_from_main(self, values: Sequence[float], device: torch.device) -> list[bool]:
        """For each value, whether some process holds another than rank 0: the same answer on every
        process, so that all of them stop together. Every process passes as many values."""
        if not self.enabled:
            return [False] * len(values)
        mine = torch.tensor(values, dtype=torch.float64, device=device)
        main = mine.clone()
        dist.broadcast(main, src=0)
        differs = (mine != main).double()
        dist.all_reduce(differs, op=dist.ReduceOp.SUM)
        return [count > 0 for count in differs.tolist()]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        """Leave the process group once every process is done (NCCL and gloo want it destroyed before exit)."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def leave_process_group() -> None:
    """Destroy the process group, if this process is in one, without waiting for the others: what a
    process that stops on an error does before it exits. Left to the interpreter's exit, gloo's threads
    are torn down while running, and about one exit in three then aborts ("terminate called without an
    active exception", SIGABRT)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class PeerStoppedError(RuntimeError):
    """Another process of the run stopped before the processes joined; its own message says why."""


def lost_contact(error: BaseException) -> bool:
    """Whether `error` is the process group's report that a collective could not complete because the
    other end is gone or silent: gloo raises a plain RuntimeError that carries its source path
    (".../gloo/transport/tcp/pair.cc: Connection closed by peer"), NCCL and the store a DistError, and
    Rendezvous a PeerStoppedError. In a multi-process run this nearly always follows another process's
    failure, which that process reports."""
    if isinstance(error, (dist.DistError, PeerStoppedError)):
        return True
    return isinstance(error, RuntimeError) and "gloo/transport/" in str(error)


class Rendezvous:
    """The job's key-value store (torchrun's, or rank 0's without torchrun), reached before anything that
    may fail in one process only: reading a config file or a checkpoint that one machine lacks, say.

    The process group is joined once the settings are known (they choose NCCL or gloo), and joining
    blocks, uninterruptibly, until every process joins. A process that failed before would leave the
    others waiting there for the group's timeout (30 minutes; on one machine torchrun kills them after
    30 s). Instead, each process announces here either that it is ready to join (`wait_for_all`) or
    that it stops (`abandon`); the ready ones poll, and a stop ends every one of them at once with
    PeerStoppedError. (Polling, not the store's blocking wait: that one takes no SIGTERM while it waits,
    and warns on stderr each time it times out.)"""

    POLL_S = 0.1

    def __init__(self, timeout: timedelta = dist.default_pg_timeout) -> None:
        self.root_store, self.rank, self.world_size = _job_store(timeout)
        # keys of this attempt only: torchrun's store outlives the workers it restarts
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"tformer/{attempt}", self.root_store)
        self.joined = False

    def wait_for_all(self, timeout: timedelta = dist.default_pg_timeout) -> None:
        """Return once every process is ready to join; raise PeerStoppedError as soon as one has stopped."""
        if self.store.add("ready", 1) == self.world_size:
            self.store.compare_set("outcome", "", "join")
        deadline = time.monotonic() + timeout.total_seconds()
        while not self.store.check(["outcome"]):
            if time.monotonic() > deadline:
                ready = self.store.add("ready", 0)
                raise ConfigError(
                    f"only {ready} of the WORLD_SIZE={self.world_size} processes of this run were ready to join "
                    f"within {timeout}; {START_THEM_ALL}"
                )
            time.sleep(self.POLL_S)
        outcome = self.store.get("outcome").decode()
        if outcome != "join":
            self._leave()
            raise PeerStoppedError(f"process {outcome} stopped before the processes joined")
        self.joined = True

    def abandon(self) -> None:
        """Tell the processes waiting in `wait_for_all` that this one stops (nothing once it has joined:
        the others then learn of it from the process group)."""
        if self.joined:
            return
        with contextlib.suppress(dist.DistError):  # the store is gone (its host stopped): they learn of it there
            self.store.compare_set("outcome", "", str(self.rank))  # unless another process stopped first
            self._leave()

    def _leave(self, linger_s: float = 10.0) -> None:
        """Done with the store. Rank 0 waits (at most `linger_s`) until every other process is: the store
        lives in rank 0 (or in torchrun on its machine, which ends with it), and a process whose store
        goes away while it polls prints a C++ stack trace."""
        self.store.add("left", 1)
        deadline = time.monotonic() + linger_s
        while self.rank == 0 and self.store.add("left", 0) < self.world_size and time.monotonic() < deadline:
            time.sleep(self.POLL_S)


START_THEM_ALL = "start every process of the job (torchrun starts them: --nproc-per-node, --nnodes)"


def _job_store(timeout: timedelta) -> tuple[dist.Store, int, int]:
    """The job's store, this process's rank and the world size, from the environment torchrun sets.

    Under torchrun its agent hosts the store, already running, and `dist.rendezvous` connects at once.
    Without torchrun (processes started by hand or by a scheduler's launcher) rank 0 hosts it, and
    `dist.rendezvous` waits inside torch, where neither Ctrl-C nor SIGTERM is taken, until every process
    has connected (rank 0) or rank 0's store is up (the others): a job started with fewer processes than
    WORLD_SIZE, or without rank 0, could be stopped only by SIGKILL for 30 minutes. So rank 0 starts its
    store without waiting, the others poll for it here, and `Rendezvous.wait_for_all` waits for all."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return next(dist.rendezvous("env://", timeout=timeout))
    rank, world_size, host, port = (_environment(name) for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    hosting = int(rank) == 0
    if not hosting:
        _wait_for_listener(host, int(port), timeout)
    store = dist.TCPStore(
        host, int(port), int(world_size), is_master=hosting, timeout=timeout, wait_for_workers=False, multi_tenant=True
    )
    return store, int(rank), int(world_size)


def _environment(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"environment variable {name} is not set; {START_THEM_ALL}")
    return value


def _wait_for_listener(host: str, port: int, timeout: timedelta) -> None:
    """Return once something accepts connections at (host, port), polling where signals are taken."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"process 0 of this run (MASTER_ADDR={host}, MASTER_PORT={port}) did not start within {timeout}; "
                f"{START_THEM_ALL}"
            )
        time.sleep(Rendezvous.POLL_S)


def init_distributed(device_name: str, rendezvous: Rendezvous | None = None) -> Distributed:
    """Join the process group torchrun describes in the environment (NCCL on GPU, gloo on CPU); with a
    `rendezvous`, through its store, once every process is ready to join.

    `device_name` is train.device; with several processes on GPUs each uses cuda:LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    # a device this machine lacks is a one-line ConfigError here, as in one process, not torch's traceback
    cuda = resolve_device(device_name).type == "cuda"
    if cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"process {rank} has LOCAL_RANK={local_rank} and would use cuda:{local_rank}, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s): start at most one process per GPU (torchrun "
            "--nproc-per-node), or train on the CPU with train.device=cpu"
        )
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        backend = "nccl" if cuda else "gloo"
        if rendezvous is None:
            dist.init_process_group(backend=backend)
        else:
            rendezvous.wait_for_all()
            # the store as init_process_group's own env:// rendezvous would give it
            store = dist.PrefixStore("default_pg", rendezvous.root_store)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    return Distributed(rank=rank, local_rank=local_rank, world_size=world_size)


def resolve_device(name: str, distributed: Distributed | None = None, *, setting: str = "train.device") -> torch.device:
    """A device name as a torch.device; "auto" picks CUDA when present. Each process of a multi-GPU run
    takes the GPU of its local rank. `setting` names where the value came from, for the error message
    (train.device in a config, --device on the command line)."""
    given = f"{setting}={name}" if not setting.startswith("--") else f"{setting} {name}"
    cpu = f"{setting}=cpu" if not setting.startswith("--") else f"{setting} cpu"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{given} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{given}: tformer runs on the CPU or CUDA; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{given} but no CUDA device is available; use {cpu}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{given}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "cuda" and distributed is not None and distributed.enabled:
        device = torch.device("cuda", distributed.local_rank)
    return device


# the dtypes a trained model may decode in (--dtype): float16's range would make the masks' most negative
# value overflow (tformer.model.masks), so it is not offered
DECODE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_decode_dtype(name: str, device: torch.device, *, setting: str = "--dtype") -> torch.dtype:
    """The dtype named by `name` (a key of DECODE_DTYPES) for decoding on `device`; bfloat16 is refused on a
    GPU without it, in one line naming `setting`."""
    if name not in DECODE_DTYPES:
        raise ConfigError(f"{setting} {name}: choose {' or '.join(DECODE_DTYPES)}")
    dtype = DECODE_DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{setting} bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16; use float32")
    return dtype


def configure_backends(device: torch.device) -> None:
    """Fast math where it is the norm: TF32 for any fp32 matmul left on the GPU (bf16 autocast covers
    most), cuDNN autotuning off (shapes change with every token-budget batch). Nothing on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = False


@functools.cache
def one_thread_after_fork() -> None:
    """Make every process forked from this one from now on (`os.fork`, multiprocessing's 'fork', gunicorn
    --preload, celery's prefork workers) compute on one thread. torch's OpenMP pool does not survive fork: a
    child of a process that has used it (loading a checkpoint does) hung for ever at its first matrix product
    on more threads, without a word. Registered once, by `load_run` and `Translator`, never at import. (Windows
    has no fork, nor `os.register_at_fork`: nothing to do there.)"""
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


def compile_layers(model: nn.Module) -> nn.Module:
    """`torch.compile` each encoder and decoder layer in place; keys and parameters stay the same.

    Per-layer compilation (as torchtitan does) compiles one small graph per layer type and keeps the
    rest of the model (masks, embeddings, the loss) eager, so a compile failure stays local and
    compile time stays short. Shapes change with every batch, so they are compiled as dynamic."""
    for stack in (model.encoder.layers, model.decoder.layers):
        for layer in stack:
            layer.compile(dynamic=True)
    return model


def compile_objective(objective: nn.Module, device: torch.device, *, inside_cuda_graph: bool = False) -> nn.Module:
    """`torch.compile` the whole training objective (model and loss, forward and backward) as one graph.

    On a GPU with mode "reduce-overhead": the compiled forward and backward are also captured as CUDA
    graphs and replayed, which removes the per-operation launch cost that bounds an eager step at
    moderate batch sizes. A graph is recorded for each new batch shape, so this pays off when shapes
    repeat (fixed-size batches, benchmarks); with token-budget batches of many shapes prefer
    `compile_layers`. `inside_cuda_graph`: the caller records the compiled objective into a CUDA graph of
    its own (training.graphed_step, which records the whole step, optimizer included), so torch.compile
    records none (its default mode). The module's parameters are the model's own: nothing is copied."""
    own_graphs = device.type == "cuda" and not inside_cuda_graph
    return torch.compile(objective, mode="reduce-overhead" if own_graphs else None)


def recording(graph: torch.cuda.CUDAGraph, device: torch.device, *, pool: tuple | None = None) -> torch.cuda.graph:
    """`torch.cuda.graph(graph, pool=pool)` for work on `device`, recorded on a capture stream of that device.

    torch's default capture stream belongs to whichever GPU was current when it was first made (cuda:0 unless
    a process sets another): kernels for tensors on cuda:1 would then go to cuda:1's own stream, run once
    eagerly, and leave an empty graph whose replays do nothing.

    The capture is thread-local: other threads may call CUDA meanwhile. The training loop's prefetch thread
    pins the next batches (training/prefetch.py), and pinning allocates page-locked memory and queries
    events, which torch's default global mode forbids to every thread while a capture is under way: the
    capture would fail, and the prefetch thread with it. Nothing that thread does belongs in the graph."""
    return torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device), capture_error_mode="thread_local")


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of the device, for MFU; None when unknown (CPUs, other GPUs)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)
