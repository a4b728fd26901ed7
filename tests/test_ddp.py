"""Data-parallel training (train.py --ddp) with real MPI processes on this machine: N ranks with a
global batch B train the parameters 1 process trains with batch B, a run resumes with another
number of ranks, and every failure ends the whole job with a message instead of hanging.

These tests start `mpiexec -n 2 python train.py --ddp ...` and skip, with the reason, where
mpi4py or a working mpiexec is missing (pip install "numgpt[mpi]" provides both).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import cupy_standin
import numgpt.backend
import numgpt.training
import train
from numgpt import distributed
from numgpt.distributed import (ABORT_GRACE_S, INSTALL_HINT, SECOND_SPEAKER_WAIT_S, Communicator, MPICommunicator,
                                NCCLCommunicator, device_communicator, flat_buffer, main_first, mpi_world)
from numgpt.errors import ConfigError
from numgpt.train_state import load_train_state
from numgpt.training import TrainConfig, Trainer, check_ranks_agree

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
        "--dropout", "0", "--dataset", "embedded", "--eval-iters", "2", "--eval-interval", "3",
        "--num-samples", "0", "--no-progress"]
STEPS = 5
TIMEOUT_S = 120   # far longer than any run here needs: reaching it means a hang
# one BLAS thread per process: two ranks on two cores, and the same arithmetic in every run
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# rank 1 of the failing-rank test: train.py whose third backward pass raises
CRASH_ON_THIRD_BACKWARD = """
import sys
import train
from numgpt.model import GPT

backward, calls = GPT.backward, []

def crash_on_third(self):
    calls.append(self)
    if len(calls) == 3:
        raise RuntimeError("injected failure")
    return backward(self)

GPT.backward = crash_on_third
sys.exit(train.main(sys.argv[1:]))
"""

# train.py on the stand-in for CuPy, on a machine with two "GPUs" whose NCCL sums over MPI on the
# host: with --ddp, numgpt's NCCLCommunicator carries the gradients; at the end, each rank says how
# many allreduces went through NCCL
ON_TWO_STANDIN_GPUS = """
import sys
import pytest
sys.path.insert(0, "tests")
import cupy_standin
import train

patch = pytest.MonkeyPatch()
cupy_standin.install(patch)
patch.setattr(cupy_standin.MODULES["cupy.cuda.runtime"], "getDeviceCount", lambda: 2)
made = []

class Counted(cupy_standin.NcclCommunicator):
    def __init__(self, *args):
        super().__init__(*args)
        made.append(self)

patch.setattr(cupy_standin.MODULES["cupy.cuda.nccl"], "NcclCommunicator", Counted)
code = train.main(sys.argv[1:])
print(f"NCCL allreduces: {[c.allreduces for c in made]}", file=sys.stderr)
sys.exit(code)
"""

# rank 1 of the Ctrl-C tests: train.py that sends itself a SIGINT while its EVALUATION-th evaluation
# estimates its train loss (each evaluation estimates two losses, train then val)
CTRL_C_IN_EVALUATION = """
import os, signal, sys
import numgpt.training
import train

estimate_loss, calls = numgpt.training.estimate_loss, []

def estimate_with_ctrl_c(model, batches):
    calls.append(batches)
    if len(calls) == 2 * EVALUATION - 1:
        os.kill(os.getpid(), signal.SIGINT)
    return estimate_loss(model, batches)

numgpt.training.estimate_loss = estimate_with_ctrl_c
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def mpiexec():
    """The mpiexec that belongs to this Python's mpi4py, checked by starting 2 ranks; else skip."""
    try:
        import mpi4py  # noqa: F401   (the package only: MPI itself starts in the ranks)
    except ImportError:
        pytest.skip(f"mpi4py is not installed ({INSTALL_HINT})")
    path = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if path is None:
        pytest.skip(f"no mpiexec on PATH ({INSTALL_HINT} provides one)")
    probe = [path, "-n", "2", sys.executable, "-c", "from mpi4py import MPI; assert MPI.COMM_WORLD.Get_size() == 2"]
    try:
        result = subprocess.run(probe, capture_output=True, text=True, timeout=60, env=ENV)
    except subprocess.TimeoutExpired:
        pytest.skip("mpiexec -n 2 did not start two mpi4py ranks within 60 s")
    if result.returncode != 0:
        pytest.skip(f"mpiexec -n 2 cannot start two mpi4py ranks: {result.stderr.strip()[-500:]}")
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


def run(command):
    """Run `command` in its own process group -> (exit status, stderr); a hang fails the test and
    leaves no rank behind."""
    proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(command[:4])} ... hung for {TIMEOUT_S} s")
    return proc.returncode, err


def train_cmd(ranks, mpiexec, out_dir, cache_dir, *flags):
    """train.py on the tiny model: as 1 plain process (ranks=None) or as `ranks` MPI ranks with --ddp."""
    args = [str(ROOT / "train.py"), *TINY, "--cache-dir", cache_dir, "--out-dir", str(out_dir), *flags]
    if ranks is None:
        return [sys.executable, *args]
    return [mpiexec, "-n", str(ranks), sys.executable, *args, "--ddp"]


def train_ok(ranks, mpiexec, out_dir, cache_dir, *flags):
    code, err = run(train_cmd(ranks, mpiexec, out_dir, cache_dir, *flags))
    assert code == 0, err


def assert_same_training(ref_dir, out_dir, exact=False):
    """The latest parameters and both AdamW moments of two runs' training states are equal: to the
    bit, or to float32 round-off (averaging the ranks' means adds in another order than one mean).

    The moments matter: AdamW's update hardly changes when every gradient is scaled (a sum over
    ranks instead of a mean, say), but the moments scale with the gradients. They are tiny (the
    second moment is about g^2), so their absolute tolerance is relative to their largest value.
    """
    (ref, ref_info), (ours, info) = load_train_state(ref_dir), load_train_state(out_dir)
    assert info["step"] == ref_info["step"] and info["data_rng"] == ref_info["data_rng"]
    for group in ref:
        assert ours[group].keys() == ref[group].keys()
        for name, a in ref[group].items():
            atol = 1e-6 if group == "param" else 1e-5 * float(np.abs(a).max())
            np.testing.assert_allclose(ours[group][name], a, rtol=0 if exact else 1e-5, atol=0 if exact else atol,
                                       err_msg=f"{group}/{name}")


def step_losses(out_dir):
    with open(Path(out_dir) / "log.jsonl") as f:
        return [row["loss"] for row in map(json.loads, f) if "loss" in row]


@pytest.fixture(scope="module")
def one_process(mpiexec, cache_dir, tmp_path_factory):
    """The reference: STEPS steps of 1 plain process with the global batch."""
    out = tmp_path_factory.mktemp("one-process")
    train_ok(None, mpiexec, out, cache_dir, "--max-iters", str(STEPS))
    return out


def test_two_ranks_train_what_one_process_trains(mpiexec, cache_dir, one_process, tmp_path):
    train_ok(2, mpiexec, tmp_path, cache_dir, "--max-iters", str(STEPS))
    assert_same_training(one_process, tmp_path)
    assert step_losses(tmp_path) == pytest.approx(step_losses(one_process), rel=1e-6)
    val_loss = [load_train_state(out)[1]["best_val_loss"] for out in (one_process, tmp_path)]
    assert val_loss[1] == pytest.approx(val_loss[0], rel=1e-6)


def test_ddp_without_mpiexec_is_the_plain_run(mpiexec, cache_dir, one_process, tmp_path):
    code, err = run([*train_cmd(None, mpiexec, tmp_path, cache_dir, "--max-iters", str(STEPS)), "--ddp"])
    assert code == 0, err
    assert "--ddp found only this process" in err and "mpiexec -n N" in err   # not silently one process
    assert_same_training(one_process, tmp_path, exact=True)


@pytest.mark.parametrize("first, then", [(2, None), (None, 2)], ids=["2-ranks-then-1", "1-then-2-ranks"])
def test_resume_with_another_number_of_ranks(mpiexec, cache_dir, one_process, tmp_path, first, then):
    train_ok(first, mpiexec, tmp_path, cache_dir, "--max-iters", "3")
    train_ok(then, mpiexec, tmp_path, cache_dir, "--resume", "--max-iters", str(STEPS))
    assert_same_training(one_process, tmp_path)


@cupy_standin.needs_compiler
def test_two_gpu_ranks_over_nccl_train_what_one_gpu_trains(mpiexec, cache_dir, tmp_path):
    """--backend cupy --ddp: one process per GPU, gradients averaged by NCCLCommunicator (through
    the stand-in's NCCL, see cupy_standin.NcclCommunicator), train what one GPU trains."""
    flags = ["--max-iters", str(STEPS), "--backend", "cupy"]
    one = train_cmd(None, mpiexec, tmp_path / "one", cache_dir, *flags)           # python train.py ...
    two = train_cmd(2, mpiexec, tmp_path / "two", cache_dir, *flags)              # mpiexec -n 2 python train.py ...
    code, err = run([one[0], "-c", ON_TWO_STANDIN_GPUS, *one[2:]])
    assert code == 0 and "NCCL allreduces: []" in err, err                       # one process: no NCCL
    code, err = run([*two[:4], "-c", ON_TWO_STANDIN_GPUS, *two[5:]])
    # on each rank, one per step (the gradients) and one per evaluation (the losses: steps 0, 3 and 5)
    assert code == 0 and err.count(f"NCCL allreduces: [{STEPS + 3}]") == 2, err
    assert_same_training(tmp_path / "one", tmp_path / "two")
    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), rel=1e-6)


def test_resume_with_dropout_is_exact_for_the_same_ranks(mpiexec, cache_dir, tmp_path):
    """Each rank draws its dropout masks from (seed, step, rank): a resume draws them again."""
    train_ok(2, mpiexec, tmp_path / "whole", cache_dir, "--dropout", "0.1", "--max-iters", "4")
    train_ok(2, mpiexec, tmp_path / "split", cache_dir, "--dropout", "0.1", "--max-iters", "2")
    train_ok(2, mpiexec, tmp_path / "split", cache_dir, "--dropout", "0.1", "--resume", "--max-iters", "4")
    assert_same_training(tmp_path / "whole", tmp_path / "split", exact=True)


def test_a_batch_that_does_not_split_evenly(mpiexec, cache_dir, tmp_path):
    """Every rank finds the mistake; rank 0 reports it, once, for the job."""
    code, err = run(train_cmd(2, mpiexec, tmp_path, cache_dir, "--batch-size", "5"))
    assert code == 2, err
    assert err.count("--batch-size 5") == 1 and "rank 0: error:" in err and "multiple of 2" in err
    assert "Traceback" not in err


def test_a_resume_on_ranks_that_do_not_divide_the_saved_batch(mpiexec, cache_dir, tmp_path):
    """--resume keeps the run's --batch-size: the advice is a number of ranks, not another batch."""
    train_ok(None, mpiexec, tmp_path, cache_dir, "--max-iters", "1")   # TINY's batch of 4
    code, err = run(train_cmd(3, mpiexec, tmp_path, cache_dir, "--resume", "--max-iters", "2"))
    assert code == 2 and "global batch of 4 rows (--batch-size)" in err and "resume it on 1, 2 or 4 ranks" in err


@pytest.mark.parametrize("differ, named", [
    ("seed", "--seed"),                                       # another flag: found before the data
    ("text", "the training tokens, the validation tokens"),   # a data file whose copy differs
    ("state", "the step, the weights"),                       # an out-dir that is not shared
])
def test_ranks_that_differ_from_rank_0_are_refused(mpiexec, cache_dir, tmp_path, differ, named):
    """Before the first step, not as a hang in the allreduce, an MPI crash, or two models trained
    as one (exit 0)."""
    texts = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for i, text in enumerate(texts):
        text.write_text("\n<|endoftext|>\n".join(f"Story {i}-{k}: the cat sat on the mat." * 5 for k in range(40)))
    dirs = [tmp_path / "r0", tmp_path / "r1"]
    flags = [["--max-iters", "4"], ["--max-iters", "4"]]
    if differ == "seed":
        flags[1] += ["--seed", "7"]
    elif differ == "text":
        flags = [[*f, "--dataset", "auto", "--data", str(text)] for f, text in zip(flags, texts)]
    else:   # the same run, saved at two steps, resumed from each rank's own copy
        train_ok(None, mpiexec, dirs[0], cache_dir, "--max-iters", "1")
        train_ok(None, mpiexec, dirs[1], cache_dir, "--max-iters", "2")
        flags = [["--resume", "--max-iters", "4"]] * 2
    out_dirs = dirs if differ == "state" else [dirs[0]] * 2
    rank0, rank1 = (train_cmd(1, mpiexec, out, cache_dir, *f) for out, f in zip(out_dirs, flags))
    code, err = run([*rank0, ":", "-n", "1", *rank1[3:]])
    assert code == 2, err
    assert f"rank 1: error: this rank's run differs from rank 0's in {named}:" in err, err


def test_a_failing_rank_ends_the_job(mpiexec, cache_dir, tmp_path):
    """Rank 1 raises in the middle of training while rank 0 waits for it in the allreduce."""
    rank0 = train_cmd(1, mpiexec, tmp_path, cache_dir, "--max-iters", str(STEPS))
    rank1 = [sys.executable, "-c", CRASH_ON_THIRD_BACKWARD, *rank0[5:]]   # the same flags
    code, err = run([*rank0, ":", "-n", "1", *rank1])
    assert code != 0
    assert "rank 1: Traceback" in err and "injected failure" in err


@pytest.mark.parametrize("evaluation", [1, 2], ids=["first-evaluation", "at-step-3"])
def test_a_ctrl_c_on_one_rank_in_an_evaluation_stops_every_rank_there(mpiexec, cache_dir, tmp_path, evaluation):
    """The stop flag travels with the evaluation's losses: both ranks stop after it, having saved
    the state of step 3, or, in a new run's first evaluation, having saved nothing."""
    rank0 = train_cmd(1, mpiexec, tmp_path, cache_dir, "--max-iters", "100")
    rank1 = [sys.executable, "-c", CTRL_C_IN_EVALUATION.replace("EVALUATION", str(evaluation)), *rank0[5:]]
    code, err = run([*rank0, ":", "-n", "1", *rank1])
    assert code == 130, err
    if evaluation == 1:
        assert not os.path.exists(tmp_path / "train_state.safetensors"), err
    else:
        assert load_train_state(tmp_path)[1]["step"] == 3 and len(step_losses(tmp_path)) == 3
        assert f"Continue with: mpiexec -n 2 python train.py --resume --out-dir {tmp_path} --ddp" in err


def test_ranks_may_fine_tune_from_copies_of_one_checkpoint(mpiexec, cache_dir, tmp_path):
    """Paths may differ between machines: what they hold is compared, the weights here."""
    train_ok(None, mpiexec, tmp_path / "pretrained", cache_dir, "--max-iters", "1")
    shutil.copytree(tmp_path / "pretrained", tmp_path / "copy")
    rank0, rank1 = (train_cmd(1, mpiexec, tmp_path / "tuned", cache_dir, "--max-iters", "2", "--init-from",
                              str(tmp_path / source)) for source in ("pretrained", "copy"))
    code, err = run([*rank0, ":", "-n", "1", *rank1[3:]])
    assert code == 0, err


@cupy_standin.needs_compiler
def test_ranks_on_two_backends_are_refused_before_nccl(mpiexec, cache_dir, tmp_path):
    """A rank on the GPU (the stand-in's) sets up NCCL, whose collectives a NumPy rank never joins:
    the backends are compared first, or the job hangs."""
    rank0 = train_cmd(1, mpiexec, tmp_path, cache_dir, "--backend", "numpy")
    gpu = train_cmd(None, mpiexec, tmp_path, cache_dir, "--backend", "cupy")
    rank1 = [gpu[0], "-c", ON_TWO_STANDIN_GPUS, *gpu[2:], "--ddp"]
    code, err = run([*rank0, ":", "-n", "1", *rank1])
    assert code == 2 and "rank 1: error: this rank's run differs from rank 0's in --backend, the backend:" in err, err


def test_mpiexec_without_ddp_is_refused(mpiexec, cache_dir, tmp_path):
    """Each process would train alone, in the same out-dir."""
    command = train_cmd(2, mpiexec, tmp_path, cache_dir)
    code, err = run(command[:-1])   # no --ddp
    assert code == 2 and "the launcher started 2 processes, which without --ddp would each train alone" in err, err


class RecordingCommunicator(Communicator):
    """Rank `rank` of `size`, without MPI: it records its barriers in `events`."""

    def __init__(self, rank, size, events=None):
        self.rank, self.size, self.events = rank, size, [] if events is None else events

    def barrier(self):
        self.events.append("barrier")


def test_main_first_runs_the_block_on_rank_0_and_then_on_the_others():
    """Rank 0 tokenizes the data into the cache before the other ranks read it: they wait at a
    barrier that rank 0 reaches only after its block. A barrier before every rank's block would
    let them all tokenize at once, or read a half-written cache."""
    for rank, expected in ((0, ["block", "barrier"]), (1, ["barrier", "block"])):
        events = []
        with main_first(RecordingCommunicator(rank, 2, events)):
            events.append("block")
        assert events == expected, rank


def test_flat_buffer_and_shards():
    """The pieces, without MPI: gradients written into the views land in one buffer, and the
    ranks' shards of a batch are its rows, each once, in order."""
    arrays = {"w": np.ones((3, 2), np.float32), "b": np.ones(4, np.float32)}
    flat, views = flat_buffer(arrays, extra=2)
    views["w"][...], views["b"][...] = arrays["w"] * 2, arrays["b"] * 3
    assert flat.dtype == np.float32 and flat.tolist() == [2.0] * 6 + [3.0] * 4 + [0.0, 0.0]
    batch = (np.arange(12).reshape(6, 2), np.arange(6))
    ranks = [RecordingCommunicator(rank, 3) for rank in range(3)]
    for i, rows in enumerate(batch):
        np.testing.assert_array_equal(np.concatenate([comm.shard(batch)[i] for comm in ranks]), rows)


def test_ddp_without_mpi4py_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)   # `from mpi4py import MPI` now fails
    assert train.main([*TINY, "--ddp", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert INSTALL_HINT in err and "Traceback" not in err


class FakeMPIComm:
    """An mpi4py communicator of `size` processes as rank `rank` sees it, without MPI: it records
    Split_type and Abort, and its bcast returns the object given."""

    def __init__(self, rank, size, local=None, events=None):
        self.rank, self.size, self.local, self.events = rank, size, local, [] if events is None else events

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Split_type(self, split_type):
        self.events.append(("split", split_type))
        return self.local

    def bcast(self, obj, root=0):
        return obj

    def Abort(self, code):
        self.events.append(("abort", code))


@pytest.fixture
def fake_mpi4py(monkeypatch):
    """`from mpi4py import MPI` finds a stand-in that holds MPI's constants: no MPI starts in pytest."""
    module = types.ModuleType("mpi4py")
    module.MPI = types.SimpleNamespace(COMM_TYPE_SHARED="shared", IN_PLACE="in place", SUM="sum")
    monkeypatch.setitem(sys.modules, "mpi4py", module)
    return module.MPI


def test_mpi_communicator_counts_the_ranks_on_this_machine(fake_mpi4py):
    """Rank 3 of 4 on a machine that runs 2 of them: the ranks that share its memory are its
    local communicator's, not the world's."""
    local = FakeMPIComm(1, 2)
    world = FakeMPIComm(3, 4, local=local)
    comm = MPICommunicator(world)
    assert (comm.rank, comm.size, comm.local_size) == (3, 4, 2) and comm.local is local
    assert world.events == [("split", "shared")]
    assert MPICommunicator(FakeMPIComm(3, 4), local=FakeMPIComm(0, 3)).local_size == 3   # one made already


@pytest.mark.parametrize("rank", [0, 1])
def test_a_failing_rank_ignores_signals_speaks_once_waits_then_aborts_the_job(monkeypatch, rank):
    """Rank 0 writes at once, the others after SECOND_SPEAKER_WAIT_S (a mistake in the flags is
    then rank 0's line alone); the message, one write, has the time to pass through mpiexec
    before the abort; and a Ctrl-C or SIGTERM in those waits would lose both."""
    events = []
    comm = MPICommunicator.__new__(MPICommunicator)   # without MPI: fail() needs only these
    comm.rank, comm.size, comm.comm = rank, 2, FakeMPIComm(rank, 2, events=events)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: events.append(("signal", signum, handler)))
    monkeypatch.setattr(time, "sleep", lambda seconds: events.append(("sleep", seconds)))
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(write=lambda text: events.append(("write", text)),
                                                             flush=lambda: events.append(("flush",))))
    comm.fail("error: --batch-size 5 is the global batch\n", 2)
    ignored = [("signal", signal.SIGINT, signal.SIG_IGN), ("signal", signal.SIGTERM, signal.SIG_IGN)]
    wait = [("sleep", SECOND_SPEAKER_WAIT_S)] if rank else []
    assert events == [*ignored, *wait, ("write", f"rank {rank}: error: --batch-size 5 is the global batch\n"),
                      ("flush",), ("sleep", ABORT_GRACE_S), ("abort", 2)]
    assert 0 < ABORT_GRACE_S < SECOND_SPEAKER_WAIT_S


def test_a_single_rank_fails_as_a_plain_process(capsys):
    comm = MPICommunicator.__new__(MPICommunicator)
    events = []
    comm.rank, comm.size, comm.comm = 0, 1, FakeMPIComm(0, 1, events=events)
    assert comm.fail("error: bad flag", 2) == 2
    assert capsys.readouterr().err == "error: bad flag\n" and events == []   # no rank prefix, no abort


@pytest.fixture
def two_standin_gpus(monkeypatch, fake_mpi4py):
    """The stand-in for CuPy on a machine with 2 GPUs; records which GPU each process uses and the
    NCCL communicators it makes: [("use", device) or ("nccl", ndev, rank)]."""
    cupy_standin.install(monkeypatch)
    events = []

    class Device(cupy_standin.Device):
        def use(self):
            events.append(("use", self.id))

    def nccl_communicator(ndev, unique_id, rank):
        events.append(("nccl", ndev, rank))

    monkeypatch.setattr(cupy_standin.MODULES["cupy.cuda.runtime"], "getDeviceCount", lambda: 2)
    monkeypatch.setattr(cupy_standin.MODULES["cupy.cuda"], "Device", Device)
    monkeypatch.setattr(cupy_standin.MODULES["cupy.cuda.nccl"], "NcclCommunicator", nccl_communicator)
    return events


def test_each_gpu_rank_uses_the_gpu_of_its_rank_on_its_machine(two_standin_gpus):
    """Rank 3 of 4, the second of two on its machine, uses that machine's GPU 1 (there is no GPU 3)
    and joins NCCL as rank 3 of 4."""
    NCCLCommunicator(FakeMPIComm(3, 4), local=FakeMPIComm(1, 2))
    assert two_standin_gpus == [("use", 1), ("nccl", 4, 3)]


def test_more_ranks_on_a_machine_than_gpus_are_refused(two_standin_gpus):
    with pytest.raises(ConfigError, match=r"rank 2 is process 3 on a machine with 2 GPU\(s\): start at most one"):
        NCCLCommunicator(FakeMPIComm(2, 3), local=FakeMPIComm(2, 3))
    assert two_standin_gpus == []   # before any GPU is used


def test_ranks_on_the_cpu_train_over_mpi_even_with_backend_auto(monkeypatch):
    """--backend auto on a machine without a usable GPU is NumPy: no NCCL (nor CuPy) is asked for."""
    monkeypatch.setattr(numgpt.backend, "cupy_available", lambda: False)
    world = RecordingCommunicator(0, 2)
    assert device_communicator(world, "auto") is world and device_communicator(world, "numpy") is world


def test_ddp_with_an_mpi4py_that_finds_no_mpi_library_says_how_to_install_one(monkeypatch):
    """mpi4py's wheel without an MPI library raises a RuntimeError when MPI loads."""
    module = types.ModuleType("mpi4py")

    def no_library(name):
        raise RuntimeError("cannot load MPI library\nlibmpi.so.12: cannot open shared object file")

    module.__getattr__ = no_library
    monkeypatch.setitem(sys.modules, "mpi4py", module)
    with pytest.raises(ConfigError, match="mpi4py finds none \\(libmpi.so.12: cannot open shared object file\\)"):
        mpi_world()


@pytest.mark.parametrize("variable", ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE"], ids=["mpich", "open-mpi"])
def test_a_launcher_whose_processes_do_not_share_mpi4pys_mpi_is_refused(monkeypatch, capsys, tmp_path, variable):
    """Another MPI's mpiexec started 2 processes (on one machine or on two: this one runs 1), and
    each finds itself alone in mpi4py's MPI: they would each train alone, in one out-dir. Without
    --ddp, too."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "2")
    monkeypatch.setattr(distributed, "mpi_world", Communicator)   # this process alone
    monkeypatch.setattr(numgpt.training, "load_data", None)       # a run that went on would fail here at once
    assert train.main([*TINY, "--ddp", "--out-dir", str(tmp_path / "a")]) == 2
    assert "mpiexec started 2 processes, but mpi4py's MPI sees only this one" in capsys.readouterr().err
    assert train.main([*TINY, "--out-dir", str(tmp_path / "b")]) == 2
    assert "the launcher started 2 processes, which without --ddp would each train alone" in capsys.readouterr().err


class RankOfTwo(Communicator):
    """Rank `rank` of 2, without MPI: what rank 0 broadcasts lands in `sent`, which rank 1 receives."""

    size = 2

    def __init__(self, rank, sent):
        self.rank, self.sent = rank, sent

    def broadcast(self, obj, root=0):
        if self.rank == root:
            self.sent.append(obj)
        return self.sent[-1]


def test_ranks_may_differ_in_paths_but_not_in_the_backend_that_auto_chose(monkeypatch, tmp_path):
    """Paths may differ between machines (what they hold is compared later); a --backend auto that
    finds a GPU on one machine and none on another would leave the NumPy rank out of NCCL."""
    cfg = TrainConfig(backend="auto")
    elsewhere = TrainConfig(backend="auto", out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                            data=[str(tmp_path / "a.txt")], init_from=str(tmp_path / "gpt2"))
    cupy_standin.install(monkeypatch)   # rank 0's machine has a GPU
    sent = []
    check_ranks_agree(RankOfTwo(0, sent), cfg)
    check_ranks_agree(RankOfTwo(1, sent), elsewhere)
    monkeypatch.setattr(numgpt.training, "get_xp", lambda backend: np)   # rank 1's has none
    with pytest.raises(ConfigError, match="this rank's run differs from rank 0's in the backend: start"):
        check_ranks_agree(RankOfTwo(1, sent), elsewhere)


@pytest.mark.parametrize("batch_size, ranks, choices", [(6, 4, "1, 2, 3 or 6 ranks"), (1, 2, "1 rank"),
                                                        (7, 2, "1 or 7 ranks")])
def test_a_resume_that_does_not_divide_the_saved_batch_names_the_ranks_that_do(tmp_path, batch_size, ranks,
                                                                               choices):
    trainer = Trainer(TrainConfig(batch_size=batch_size, out_dir=str(tmp_path)), comm=RecordingCommunicator(0, ranks))
    with trainer, pytest.raises(ConfigError) as error:
        trainer.setup(resume=True)
    assert str(error.value).endswith(f"which {ranks} cannot do: resume it on {choices}")
