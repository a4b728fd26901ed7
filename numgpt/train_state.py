"""The training state: everything a run needs to continue exactly where it stopped.

One file, `<out-dir>/train_state.safetensors`: the latest parameters and both AdamW moments as
tensors, and in its metadata a JSON document with the step, every random generator's state, the
model and training configuration and the best validation loss, and each tensor's CRC-32 (checked
on load: see numgpt.checkpoint). One file can be replaced atomically, so a run killed at any
moment leaves either the previous state or the new one.
"""

import json
import os

import numpy as np

from numgpt.backend import to_numpy
from numgpt.checkpoint import CHECKSUMS_KEY, checksum_problem, kind_mismatch, tensor_checksums, write_safetensors
from numgpt.errors import CheckpointError

STATE_FILE = "train_state.safetensors"
STATE_KEY = "numgpt_train_state"
GROUPS = ("param", "adam_m", "adam_v")
# what save_train_state's callers put in `info` (and loss_scaler, in fp16 runs), and adam_step, with
# the kind of JSON value (numgpt.checkpoint.JSON_KINDS) each holds
INFO_KINDS = {"step": "an integer", "best_val_loss": "a number", "model_config": "an object",
              "train_config": "an object", "source": "a string", "data_rng": "an object", "adam_step": "an integer"}


def save_train_state(out_dir, model, optimizer, info):
    """Write the model's parameters, the optimizer's moments and the JSON-able dict `info`."""
    moments = optimizer.state_dict()
    arrays = {"param": model.params, "adam_m": moments["m"], "adam_v": moments["v"]}
    tensors = {f"{group}/{name}": np.ascontiguousarray(to_numpy(a))
               for group in GROUPS for name, a in arrays[group].items()}
    info = {**info, "adam_step": moments["step"]}
    metadata = {STATE_KEY: json.dumps(info), CHECKSUMS_KEY: tensor_checksums(tensors)}
    write_safetensors(os.path.join(out_dir, STATE_FILE), tensors, metadata)


def saved_step(out_dir):
    """The step of the training state in `out_dir`, read from its metadata alone; None when there
    is no state there or it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(out_dir, STATE_FILE), framework="numpy") as f:
            return int(json.loads(f.metadata()[STATE_KEY])["step"])
    except Exception:   # absent, truncated or foreign: the caller only wants to name the step
        return None


def load_train_state(out_dir):
    """({group: {name: array}}, info) from `out_dir`, or CheckpointError saying what is wrong."""
    arrays, info = _read_state(out_dir, read_tensors=True)
    # a run stops before it saves a diverged state (Trainer.check_finite), so NaN or inf here came
    # later; resumed, it would spread to every parameter at the first step
    non_finite = next((f"{group} tensor {name}" for group in GROUPS for name, a in arrays[group].items()
                       if not np.isfinite(a).all()), None)
    if non_finite:
        raise damaged_state(out_dir, f"its {non_finite} holds NaN or infinite numbers")
    # the second moment is a running mean of squares; a negative one would put NaN (its square root)
    # into every update of that tensor
    negative = next((name for name, v in arrays["adam_v"].items() if (v < 0).any()), None)
    if negative:
        raise damaged_state(out_dir, f"its adam_v tensor {negative} holds negative numbers")
    return arrays, info


def load_train_info(out_dir):
    """The metadata (info) of the training state in `out_dir`, checked as load_train_state checks
    it, its tensors left unread: what --resume needs to settle the run's settings, before the
    trainer reads the tensors once."""
    return _read_state(out_dir, read_tensors=False)[1]


def _read_state(out_dir, read_tensors):
    """(arrays, info) of the state in `out_dir` after every check of its metadata and tensor names;
    each array is None unless `read_tensors`."""
    from safetensors import safe_open

    path = os.path.join(out_dir, STATE_FILE)
    if os.path.isdir(path):
        raise CheckpointError(f"cannot resume: {path} is a directory, not numgpt's training state: move it away")
    if not os.path.isfile(path):
        raise CheckpointError(f"cannot resume: {path} does not exist. Train without --resume first, "
                              f"or point --out-dir at the run to continue")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            info = json.loads(metadata[STATE_KEY])
            tensors = {key: f.get_tensor(key) if read_tensors else None for key in f.keys()}
            damaged = checksum_problem(tensors, metadata, path) if read_tensors else None
        arrays = {group: {} for group in GROUPS}
        for key, tensor in tensors.items():
            group, name = key.split("/", 1)
            arrays[group][name] = tensor
    except Exception as e:   # truncated file, foreign file, missing metadata, bad JSON
        raise CheckpointError(f"cannot resume: {path} is corrupt or not a numgpt training state ({e}). "
                              f"Start over with --overwrite, or restore the file") from None
    if damaged:
        raise CheckpointError(f"cannot resume: {damaged}. Restore the file from a good copy, or start over "
                              f"with --overwrite")
    if not isinstance(info, dict) or not set(INFO_KINDS) <= set(info):
        missing = sorted(set(INFO_KINDS) - set(info)) if isinstance(info, dict) else "everything"
        raise damaged_state(out_dir, f"its metadata lacks {missing}")
    mismatch = kind_mismatch(INFO_KINDS, info)
    if mismatch:
        raise damaged_state(out_dir, f"its {mismatch}")
    # AdamW counts the steps it took; fp16 runs skip steps whose gradients overflowed, so it may lag
    if not 0 <= info["adam_step"] <= info["step"]:
        raise damaged_state(out_dir, f"its step {info['step']} and adam_step {info['adam_step']} are not "
                                     f"0 <= adam_step <= step")
    # a cross-entropy is >= 0; JSON's NaN, which would never be improved on, fails the comparison too
    if not info["best_val_loss"] >= 0:
        raise damaged_state(out_dir, f"its best_val_loss {info['best_val_loss']} is not a number >= 0")
    if not arrays["param"] or not set(arrays["param"]) == set(arrays["adam_m"]) == set(arrays["adam_v"]):
        raise damaged_state(out_dir, "its parameters and AdamW moments do not name the same tensors")
    return arrays, info


def damaged_state(out_dir, problem):
    """The CheckpointError for a training state that reads as one but does not fit this numgpt."""
    return CheckpointError(f"cannot resume: {os.path.join(out_dir, STATE_FILE)} is damaged or was written by "
                           f"another numgpt version ({problem}). Start over with --overwrite, or resume it "
                           f"with the numgpt version that wrote it")
