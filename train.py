"""Train a GPT with numgpt.

    python train.py                                  # small model, embedded stories, a few CPU minutes
    python train.py --preset tinystories-tutorial    # the classic TinyStories tutorial setup
    python train.py --data my_text.txt --max-iters 2000
    python train.py --resume                         # continue the run in --out-dir exactly
    python train.py --overwrite                      # start over in an --out-dir that holds a run
    mpiexec -n 2 python train.py --ddp               # data-parallel over 2 processes (numgpt[mpi])

Settings come from the defaults, then --preset, then the flags you give; --resume takes the run's
saved settings and lets you change only those that do not alter the run's past (e.g. --max-iters).
"""

import os
import signal

# What mpiexec tells each process it starts: how many it started in all, and on this machine
# (MPICH's and Intel MPI's Hydra, then Open MPI's); and the variables that set a BLAS's threads
# (bench/common.py names them too: each sets them before NumPy loads, so neither imports the other)
LAUNCHED_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
LOCAL_RANKS_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def launcher_count(names, environ=os.environ):
    """The count in the first of the variables `names` that holds one: 1 without a launcher."""
    return next((int(environ[name]) for name in names if environ.get(name, "").isdigit()), 1)


def share_cores_among_local_ranks(environ=os.environ):
    """Give each of the ranks that mpiexec started on this machine its share of the cores as BLAS
    threads, unless the user chose a number: each would start one thread per core, and N ranks
    would fight over them (2 ranks on 2 cores ran 1.6-3x slower). torchrun does the same, with 1
    thread. It must run before NumPy loads its BLAS, which reads the variables once. (A launcher
    that binds each rank to some cores has narrowed the affinity already, and it is divided again:
    set OMP_NUM_THREADS yourself there.)"""
    local = launcher_count(LOCAL_RANKS_VARIABLES, environ)
    if local > 1 and not any(name in environ for name in THREAD_VARIABLES):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        environ.update(dict.fromkeys(THREAD_VARIABLES, str(max(1, cores // local))))


if __name__ == "__main__":
    # until main() takes over, a Ctrl-C ends the program quietly, as any command's does, instead of
    # in a traceback from whichever of NumPy's modules was being imported
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    share_cores_among_local_ranks()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

from numgpt import console  # noqa: E402
from numgpt.errors import NumGPTError, describe_os_error  # noqa: E402

# flags that --resume may change; anything else must match the saved run
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "num_samples", "sample_tokens", "backend", "precision",
             "out_dir", "cache_dir", "dataset", "data"}
# the JSON kind (numgpt.checkpoint.JSON_KINDS) of a saved TrainConfig setting, by its annotation
SETTING_KINDS = {str: "a string", int: "an integer", float: "a number", list: "a list of strings",
                 bool: "true or false"}


def parse_args(argv=None):
    from numgpt.layers.activations import ACTIVATIONS
    from numgpt.training import PRESETS, TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train a GPT-2-style model with numgpt.",
                                argument_default=argparse.SUPPRESS)  # unset flags stay unset: presets fill them
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["auto", "tinystories", "embedded"], help=f"data source; auto uses "
                   f"TinyStories when it can be reached or is cached, else the embedded stories (default {d.dataset})")
    g.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                   help="local text files instead of a dataset; lines that are exactly <|endoftext|> separate "
                        "documents, and the last tenth of them is the validation split (the last tenth of the "
                        "tokens when those documents hold more: one long file, two books)")
    g.add_argument("--cache-dir", help=f"where tokenized data is cached (default {d.cache_dir})")
    g = p.add_argument_group("run")
    presets = [f"{name} is " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
               for name, settings in sorted(PRESETS.items()) if settings]
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"a named setup; flags you give override it. {'; '.join(presets)}")
    g.add_argument("--out-dir", help=f"checkpoint, log and plot directory (default {d.out_dir})")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out-dir that holds one, "
                   "deleting that run's model, state, log and plot")
    g.add_argument("--ddp", action="store_true", help="data-parallel training over the processes that "
                   "'mpiexec -n N' starts (NCCL between GPUs); --batch-size is then the global batch, split "
                   "across them. Needs pip install \"numgpt[mpi]\"")
    g.add_argument("--init-from", help="'scratch' or a HuggingFace GPT-2 directory to fine-tune (default scratch)")
    g.add_argument("--seed", type=int, help=f"seed of init, batches, dropout and samples (default {d.seed})")
    g.add_argument("--backend", choices=["numpy", "cupy", "auto"], help=f"array backend (default {d.backend})")
    g.add_argument("--dtype", choices=["float32", "float64"], help=f"working precision (default {d.dtype})")
    g.add_argument("--precision", choices=["fp32", "tf32", "fp16"], help=f"matmul precision on a GPU: tf32 tensor "
                   f"cores, or fp16 mixed precision (float16 matmuls, float32 weights, loss scaling) "
                   f"(default {d.precision})")
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, help=f"transformer blocks (default {d.n_layer})")
    g.add_argument("--n-head", type=int, help=f"attention heads (default {d.n_head})")
    g.add_argument("--n-embd", type=int, help=f"embedding width (default {d.n_embd})")
    g.add_argument("--block-size", type=int, help=f"context length in tokens (default {d.block_size})")
    g.add_argument("--dropout", type=float, help=f"dropout probability (default {d.dropout})")
    g.add_argument("--activation", choices=list(ACTIVATIONS),
                   help=f"MLP activation (default {d.activation})")
    g.add_argument("--tie-weights", action=argparse.BooleanOptionalAction,
                   help="the output layer is the token embedding, as in GPT-2; --no-tie-weights gives it its "
                        "own weights (default: tied)")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction,
                   help="biases in the linear layers and layernorms, as in GPT-2 (default: with biases)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-iters", type=int, help=f"optimizer steps (default {d.max_iters})")
    g.add_argument("--batch-size", type=int, help=f"sequences per micro-batch, over all ranks with --ddp "
                   f"(default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, help=f"micro-batches per step (default {d.grad_accum})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default lr / 10)")
    g.add_argument("--warmup-iters", type=int, help=f"linear warmup steps (default {d.warmup_iters})")
    g.add_argument("--beta2", type=float, help=f"AdamW's second-moment decay (default {d.beta2})")
    g.add_argument("--weight-decay", type=float,
                   help=f"AdamW weight decay of the weight matrices and embeddings (default {d.weight_decay})")
    g.add_argument("--grad-clip", type=float, help=f"clip the global gradient norm; 0 = off (default {d.grad_clip})")
    g = p.add_argument_group("evaluation and samples")
    g.add_argument("--eval-interval", type=int, help=f"steps between evaluations (default {d.eval_interval})")
    g.add_argument("--eval-iters", type=int, help=f"batches per evaluation (default {d.eval_iters})")
    g.add_argument("--eval-seed", type=int, help=f"seed of the evaluation batches, the same in every evaluation; "
                   f"not --seed's, so that runs of several seeds are scored on the same text (default {d.eval_seed})")
    g.add_argument("--num-samples", type=int, help=f"stories generated at the end (default {d.num_samples})")
    g.add_argument("--sample-tokens", type=int, help=f"tokens per generated story (default {d.sample_tokens})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal anyway)")
    return p.parse_args(argv)


def same_setting(name, saved, given):
    """Whether a flag given to --resume repeats the saved run's setting: --init-from ./gpt2 names
    the directory a run saved as gpt2 (relative, by a numgpt that did not yet make it absolute)."""
    if saved == given:
        return True
    try:
        return name == "init_from" and "scratch" not in (saved, given) and os.path.samefile(saved, given)
    except OSError:   # either one is gone: the saved run cannot be checked against it
        return False


def resolve_config(args):
    """The TrainConfig for these flags: defaults < preset < flags, or the saved run < flags on --resume."""
    from numgpt.checkpoint import kind_mismatch
    from numgpt.train_state import damaged_state, load_train_info
    from numgpt.training import PRESETS, TrainConfig, with_checkpoint_shape

    given = {k: v for k, v in vars(args).items() if k not in ("preset", "resume", "overwrite", "ddp", "no_progress")}
    if "data" in given:   # saved with the run, which may be resumed from another directory
        if "" in given["data"]:   # an unset shell variable, say: abspath would make it the current directory
            raise NumGPTError("--data has an empty path: name a text file")
        given["data"] = [os.path.abspath(path) for path in given["data"]]
    if given.get("cache_dir"):   # saved too: a resume from another directory finds the same cache
        given["cache_dir"] = os.path.abspath(given["cache_dir"])
    if given.get("init_from", "scratch") != "scratch":   # saved too, and named alike on a resume
        given["init_from"] = os.path.abspath(given["init_from"])
    if getattr(args, "resume", False):
        if getattr(args, "overwrite", False):
            raise NumGPTError("--resume continues the run in --out-dir and --overwrite deletes it: give one of them")
        if getattr(args, "preset", None):
            raise NumGPTError("--resume takes the saved run's settings, not a --preset's: drop --preset")
        out_dir = given.get("out_dir", TrainConfig.out_dir)
        info = load_train_info(out_dir)   # the tensors wait for the trainer: read once, not twice
        saved = info["train_config"]
        if not isinstance(saved, dict):
            raise damaged_state(out_dir, "its train_config is not a table of settings")
        # a setting this numgpt does not know comes from a newer one, whose run it cannot repeat;
        # one it lacks comes from an older numgpt, which ran with what is still the default
        unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise damaged_state(out_dir, f"its train_config has settings this numgpt does not know: {unknown}")
        # a hand-edited value of the wrong kind, such as a string n_layer
        mismatch = kind_mismatch({name: SETTING_KINDS[TrainConfig.__annotations__[name]] for name in saved}, saved)
        if mismatch:
            raise damaged_state(out_dir, f"its train_config's {mismatch}")
        # a setting the state lacks comes from an older numgpt: the run used what the state says
        # elsewhere (before --eval-seed, --seed drew the evaluation batches; the model's own config
        # says whether it was tied and had biases, as an --init-from checkpoint decided), else what
        # is still the default
        model = info["model_config"]   # (a value of the wrong kind there is the trainer's to name)
        older = {"eval_seed": saved.get("seed", TrainConfig.seed),
                 **{name: model[name] for name in ("tie_weights", "bias") if isinstance(model.get(name), bool)}}
        saved = {**older, **saved}
        run_settings = vars(TrainConfig(**saved))   # with the defaults the run had, resolved (min_lr)
        changed = sorted(k for k, v in given.items()
                         if k not in RESUMABLE and not same_setting(k, run_settings[k], v))
        if changed:
            raise NumGPTError(f"--resume continues the saved run, which used different "
                              f"{', '.join('--' + k.replace('_', '-') for k in changed)}: drop those flags, "
                              f"or start a new run in another --out-dir")
        # the token cache is only this machine's store of the tokens: a run copied from another machine
        # (or whose cache was deleted) names a directory that is not here, which would be created,
        # anywhere the file says. This machine's default serves instead
        if "cache_dir" not in given and not os.path.isdir(saved.get("cache_dir", "")):
            saved = {k: v for k, v in saved.items() if k != "cache_dir"}
        if "data" in given or "dataset" in given:   # a data source given replaces the saved one
            saved = {k: v for k, v in saved.items() if k not in ("data", "dataset")}
        # the run lives where it was read from: a copied or moved out-dir is continued where it is now
        cfg = TrainConfig(**{**saved, **given, "out_dir": out_dir})
        cfg.validate()
        # a GPU run's tf32 continued on the CPU, which has no such mode: the flag that fixes it is the
        # resumable --precision, not the "--backend cupy" that the CPU's own refusal suggests
        if cfg.precision == "tf32" and "precision" not in given and cfg.backend != "cupy":
            from numgpt.backend import cupy_available
            if cfg.backend == "numpy" or not cupy_available():
                raise NumGPTError("this run trained with --precision tf32, a mode of NVIDIA tensor cores that the "
                                  "CPU does not have: give --precision fp32 too to continue it on the CPU")
        if cfg.max_iters < info["step"]:   # it would train nothing and say "Done" at the saved step
            raise NumGPTError(f"--max-iters {cfg.max_iters} is below the saved run's step {info['step']}: "
                              f"give a larger --max-iters to train on")
        return cfg
    preset = dict(PRESETS[getattr(args, "preset", "default")])
    if "data" in given:   # your files replace the preset's dataset
        preset.pop("dataset", None)
    if "lr" in given and "min_lr" in preset and "min_lr" not in given:
        # a preset's min_lr is a fraction of its lr (1 for a constant rate): your --lr scales it alike.
        # The fraction first: 1e-3 * (x / 1e-3) can round to just above x, which validate() refuses
        preset["min_lr"] = given["lr"] * (preset["min_lr"] / preset.get("lr", TrainConfig.lr))
    cfg = TrainConfig(**{**preset, **given})
    if cfg.init_from != "scratch":
        cfg = with_checkpoint_shape(cfg, given)
    cfg.validate()
    return cfg


def resume_hint(trainer):
    """The command that continues `trainer`'s run, when it saved (or resumed) a state with steps left
    to train; else "". The out-dir's state alone says nothing: it may be the run --overwrite was
    about to replace."""
    if trainer is None or trainer.checkpoint_step is None or trainer.checkpoint_step >= trainer.cfg.max_iters:
        return ""
    command = f"python train.py --resume --out-dir {console.shell_quote(trainer.cfg.out_dir)}"
    if trainer.comm.size > 1:   # the mpiexec options it was started with (-hosts, say) are not known here
        return (f" Continue with: mpiexec -n {trainer.comm.size} {command} --ddp (and any other mpiexec "
                f"options you gave)")
    return f" Continue with: {command}"


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop, raised where the program is, as Ctrl-C's KeyboardInterrupt
    is: the run stops there, and removes what it was writing (a token cache, a new out-dir)."""


def raise_terminated(signum, frame):
    raise Terminated


def stop_status(trainer, interrupt=None):
    """The shell's exit status for a run that a signal stopped, named by the first one: 130 for
    Ctrl-C, 143 for SIGTERM. In the training loop the trainer records it; outside, `interrupt`
    tells (a Terminated one is SIGTERM's). A rank that did not receive it itself stopped with the
    others, as for a Ctrl-C."""
    signum = None if trainer is None else trainer.stop.signum
    if signum is None:
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
    return 128 + signum


def main(argv=None):
    from numgpt import distributed

    sys.stdout, sys.stderr = console.standard_streams()   # closed ones go to os.devnull (see there)
    args = parse_args(argv)

    # the imports are done: from here on a Ctrl-C or a SIGTERM is numgpt's to handle. In the training
    # loop it saves, then stops (numgpt.training.StopRequest); before or after, it stops at once.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sigterm_handler = signal.signal(signal.SIGTERM, raise_terminated)

    world = distributed.Communicator()   # this process alone, unless --ddp finds others
    trainer = None
    try:
        from numgpt.training import Trainer, check_ranks_agree, generate_samples

        launched = launcher_count(LAUNCHED_VARIABLES)
        if getattr(args, "ddp", False):
            world = distributed.mpi_world()
            if world.size < launched:   # each rank is alone in its own MPI: they would all train alone
                raise NumGPTError(f"mpiexec started {launched} processes, but mpi4py's MPI sees only this one: "
                                  f"use the mpiexec of the MPI that mpi4py uses (numgpt[mpi] installs one "
                                  f"beside this Python: {os.path.join(os.path.dirname(sys.executable), 'mpiexec')})")
            if world.size == 1:   # it trains, as the plain run: say so, or it looks data-parallel
                print("note: --ddp found only this process, so it trains alone; start several with "
                      "mpiexec -n N python train.py --ddp", file=sys.stderr)
        elif launched > 1:
            raise NumGPTError(f"the launcher started {launched} processes, which without --ddp would each train "
                              f"alone: add --ddp")
        cfg = resolve_config(args)
        check_ranks_agree(world, cfg)   # before the device's communicator, which every rank must join
        comm = distributed.device_communicator(world, cfg.backend)
        with Trainer(cfg, progress=not getattr(args, "no_progress", False), comm=comm) as trainer:
            trainer.setup(resume=getattr(args, "resume", False), overwrite=getattr(args, "overwrite", False))
            if trainer.step == 0 and cfg.num_samples and trainer.is_main:
                print("\nBefore training:\n" + generate_samples(trainer.model, 1, 30, cfg.seed)[0])
            outcome = trainer.run()
            if not trainer.is_main:   # rank 0 reports for the job
                return stop_status(trainer) if outcome == "interrupted" else 0
            if outcome == "interrupted":
                print(f"\nInterrupted: saved step {trainer.step} to {cfg.out_dir}.{resume_hint(trainer)}",
                      file=sys.stderr)
                return stop_status(trainer)
            print(f"\nDone: {console.counted(trainer.step, 'step')}, best val loss {trainer.best_val:.4f}; "
                  f"model in {cfg.out_dir}/ (python sample.py --ckpt {console.shell_quote(cfg.out_dir)})")
            if cfg.num_samples:
                from numgpt.model import GPT
                best = GPT.from_pretrained(cfg.out_dir, backend=cfg.backend, dtype=cfg.dtype)
                print("\nAfter training:")
                for text in generate_samples(best, cfg.num_samples, cfg.sample_tokens, cfg.seed):
                    print("\n" + text)
            sys.stdout.flush()   # here a write error is one named line; in the flush at exit, "Exception ignored"
            return 0
    # With several ranks, world.fail ends the whole job: the other ranks would otherwise wait
    # forever for this one. On its own, a process prints the message and exits with the code.
    except NumGPTError as e:
        return world.fail(f"error: {e}", 2)
    except OSError as e:   # a full disk, a read-only out-dir: the last saved checkpoint, if any, is intact
        saved = trainer is not None and trainer.checkpoint_step is not None
        intact = f". The last checkpoint saved in the out-dir is intact.{resume_hint(trainer)}" if saved else ""
        return world.fail(f"error: {describe_os_error(e)}{intact}", 1)
    except MemoryError as e:   # numpy's "Unable to allocate 13.4 GiB for an array ...", or the GPU's
        reason = f": {e}" if str(e) else ""   # Python's own MemoryError has no message
        return world.fail(f"error: out of memory{reason}. Use a smaller --batch-size or --block-size, "
                          f"or a smaller model (--n-layer, --n-embd)", 1)
    except KeyboardInterrupt as e:   # a second Ctrl-C or SIGTERM, or one outside the loop: the saved state is intact
        return world.fail("\nStopped." + resume_hint(trainer), stop_status(trainer, e))
    except Exception:   # a bug in numgpt: keep its traceback, and with several ranks, end the job
        if world.size == 1:
            raise
        return world.fail(traceback.format_exc(), 1)
    finally:   # for a caller that goes on (the tests): SIGTERM is its own again
        signal.signal(signal.SIGTERM, sigterm_handler)


if __name__ == "__main__":
    sys.exit(main())
