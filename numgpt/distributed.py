"""Data-parallel training: every process (rank) holds the whole model and trains on its share of
each batch.

    global batch of B rows, drawn identically on every rank  ->  rank r keeps rows [r B/N, (r+1) B/N)
    forward + backward on those rows                         ->  gradient of the rank's mean loss
    allreduce_mean over one flat buffer of all gradients     ->  gradient of the global mean loss
    the same clipping and AdamW update on every rank         ->  the same parameters on every rank

The mean of the ranks' mean losses is the global batch's mean loss because every rank has the
same number of rows, so N ranks compute what one process computes with the whole batch (up to
the order of float additions).

MPI starts the processes (`mpiexec -n N python train.py --ddp ...`) and tells each its rank.
Gradients travel over MPI between CPUs and over NCCL between GPUs (one process per GPU), behind
one small interface, `Communicator`, whose base class is the single-process case: every
collective is a no-op there, so the training loop has one code path for 1 and for N ranks.
"""

import contextlib
import signal
import sys
import time

import numpy as np

from numgpt.backend import array_module, get_xp
from numgpt.errors import ConfigError

INSTALL_HINT = 'pip install "numgpt[mpi]"'
# How long a failing rank waits between writing its message and aborting the job. mpiexec's
# per-machine proxy forwards each rank's stderr through a pipe, and on an abort it kills the ranks
# and exits without draining that pipe: a message flushed just before MPI_Abort is sometimes lost
# (it was, once, in CI). A pause this long lets the proxy pass it on; the job is ending anyway.
ABORT_GRACE_S = 1.0
# How long a failing rank other than 0 waits before it writes its message. A mistake in the flags
# fails every rank alike: rank 0, which writes at once, then ends the job before the others repeat
# its message. A failure of this rank alone (its data file missing, say) is written after the wait.
SECOND_SPEAKER_WAIT_S = 2 * ABORT_GRACE_S


class Communicator:
    """What data-parallel training asks of the processes: this one is the only one (rank 0 of 1).

    Subclasses talk to other processes; each method says what it must do there.
    """

    rank = 0
    size = 1
    local_size = 1   # the ranks on this machine, which share its memory

    def allreduce_mean(self, buf):
        """Replace the contiguous array `buf` (of the model's array module) in place by its
        elementwise mean over all ranks, and return it."""
        return buf

    def broadcast(self, obj, root=0):
        """Rank `root`'s Python object `obj`, returned on every rank."""
        return obj

    def barrier(self):
        """Return only when every rank has called barrier()."""

    def fail(self, message, code):
        """Report an error that ends this process; returns the exit status to use."""
        print(message, file=sys.stderr)
        return code

    def shard(self, arrays):
        """This rank's rows of each array in `arrays` (e.g. the x and y of a global batch):
        an equal, contiguous share of them."""
        rows = len(arrays[0]) // self.size
        return tuple(a[self.rank * rows:(self.rank + 1) * rows] for a in arrays)


class MPICommunicator(Communicator):
    """The processes of an MPI communicator (mpi4py), e.g. all those `mpiexec -n N` started."""

    def __init__(self, comm, local=None):
        """`local`: the communicator of this machine's ranks within `comm`, when one was made."""
        from mpi4py import MPI

        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local = comm.Split_type(MPI.COMM_TYPE_SHARED) if local is None else local
        self.local_size = self.local.Get_size()

    def allreduce_mean(self, buf):
        from mpi4py import MPI

        if self.size > 1:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)   # in place: no second buffer
            buf /= self.size
        return buf

    def broadcast(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def barrier(self):
        self.comm.Barrier()

    def fail(self, message, code):
        """With several ranks, take the whole job down: the others would wait for this one forever
        in their next collective."""
        if self.size == 1:
            return super().fail(message, code)
        # the job is ending: a Ctrl-C or a scheduler's SIGTERM now would raise out of the waits
        # below, lose the message and skip the abort, leaving the other ranks waiting
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        if self.rank != 0:
            time.sleep(SECOND_SPEAKER_WAIT_S)
        # one write: print's two (the text, then its newline) interleave with other ranks' lines
        sys.stderr.write(f"rank {self.rank}: {message.strip()}\n")
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)   # never returns: mpiexec ends every rank and exits with `code`


class NCCLCommunicator(MPICommunicator):
    """GPUs, one process each, whose gradients travel over NCCL (through CuPy); MPI still starts
    the processes and carries the small host-side messages (the NCCL id, broadcast, barrier,
    abort). Rank r uses the r-th GPU of its machine.

    Not yet run on GPUs. Its calls match CuPy 14.2's cupy.cuda.nccl (names, NCCL's numbers, the
    arguments of allReduce), and the tests run it with two ranks on the stand-in for CuPy, whose
    NCCL sums over MPI on the host: they train what one process trains.
    """

    def __init__(self, comm, local=None):
        import cupy
        from cupy.cuda import nccl

        super().__init__(comm, local)
        if not nccl.available:
            raise ConfigError("--ddp on GPUs needs NCCL, which CuPy cannot find: pip install nvidia-nccl-cu12")
        local_rank = self.local.Get_rank()   # rank among this machine's
        gpus = cupy.cuda.runtime.getDeviceCount()
        if local_rank >= gpus:
            raise ConfigError(f"rank {self.rank} is process {local_rank + 1} on a machine with {gpus} GPU(s): "
                              f"start at most one process per GPU on each machine")
        cupy.cuda.Device(local_rank).use()        # before the model allocates anything
        unique_id = comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, unique_id, self.rank)
        self.nccl_types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
        self.nccl_sum = nccl.NCCL_SUM

    def allreduce_mean(self, buf):
        import cupy

        # queued on the current stream, so it runs after the backward kernels that filled buf
        # and before anything that reads it
        self.nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self.nccl_types[buf.dtype], self.nccl_sum,
                            cupy.cuda.get_current_stream().ptr)
        buf /= self.size
        return buf


def differences_from_rank_0(comm, facts):
    """The names in `facts` ({name: value}, the same names on every rank) whose value on this rank
    differs from rank 0's; none on rank 0 itself, or without other ranks."""
    reference = comm.broadcast(facts if comm.rank == 0 else None)
    return [name for name, value in facts.items() if reference.get(name) != value]


def mpi_world():
    """An MPICommunicator over every process mpiexec started (just this one without mpiexec)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ConfigError(f"--ddp needs mpi4py ({e}): {INSTALL_HINT}") from None
    except RuntimeError as e:   # mpi4py's wheel is there, but no MPI library for it to load
        raise ConfigError(f"--ddp needs an MPI library, and mpi4py finds none ({str(e).splitlines()[-1]}): "
                          f"{INSTALL_HINT}") from None
    return MPICommunicator(MPI.COMM_WORLD)


def device_communicator(world, backend):
    """The communicator to train with on `backend`: `world` itself for NumPy (and for a single
    rank), an NCCLCommunicator over the same processes for CuPy."""
    if world.size == 1 or get_xp(backend) is np:
        return world
    return NCCLCommunicator(world.comm, world.local)


@contextlib.contextmanager
def main_first(comm):
    """Run the block on rank 0 first and on the other ranks after it, e.g. to fill a cache once
    that the others then read. The block must not use collectives: the other ranks are waiting."""
    if comm.rank != 0:
        comm.barrier()
    yield
    if comm.rank == 0:
        comm.barrier()


def flat_buffer(arrays, extra=0):
    """(flat, views): one contiguous zeroed buffer with room for an array shaped like each of
    `arrays` (a dict) and `extra` scalars at its end, and {name: view of flat} in those shapes.

    Gradients written into the views are already packed, so a whole model's gradients travel in
    one message instead of one per parameter, and need no unpacking afterwards.
    """
    first = next(iter(arrays.values()))
    flat = array_module(first).zeros(sum(a.size for a in arrays.values()) + extra, dtype=first.dtype)
    views, offset = {}, 0
    for name, a in arrays.items():
        views[name] = flat[offset:offset + a.size].reshape(a.shape)
        offset += a.size
    return flat, views
