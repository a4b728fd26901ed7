"""HuggingFace GPT-2 checkpoints: a directory with config.json and model.safetensors.

Reads both key styles found in the wild, "transformer.h.0.attn.c_attn.weight" (what transformers
saves) and "h.0.attn.c_attn.weight" (OpenAI's GPT-2 on the hub), skips the causal-mask buffers
that older files carry, and ties lm_head to wte when it is absent. Writes what transformers writes.
Every file is written atomically, so a crash mid-save leaves the previous file intact, and the
weights carry a CRC-32 of each tensor in their metadata, so bytes that change on disk later are
named on load.
"""

import contextlib
import json
import math
import os
import re
import tempfile
import time
import zlib

import numpy as np

from numgpt.config import GPTConfig, param_shapes, params_mismatch
from numgpt.console import counted
from numgpt.errors import CheckpointError, ConfigError, saying

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# a large model's weights in several files: {"weight_map": {tensor name: file}} (transformers'
# save_pretrained shards a model above its max_shard_size, 5 GB by default)
INDEX_FILE = "model.safetensors.index.json"
PREFIX = "transformer."
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")   # causal masks, not parameters
# transformers' classes whose weights are numgpt's: the language model, and its body alone (whose
# output layer is then the tied token embedding, as transformers' GPT2LMHeadModel loads it too)
LANGUAGE_MODEL_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# the safetensors metadata entry where numgpt writes a CRC-32 of each tensor's bytes (JSON {name: crc}),
# so that bytes changed on disk after the save fail the load instead of loading as different weights
CHECKSUMS_KEY = "numgpt_crc32"

# our activation name <-> transformers' activation_function
HF_ACTIVATION = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
FROM_HF_ACTIVATION = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}

# What each config.json field that config_from_hf reads must hold. Checked before any is used, so a
# hand-edited file gets a CheckpointError naming the field, not a TypeError from deep inside.
JSON_KINDS = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),   # Python's bool is an int
    "an integer or null": lambda v: v is None or JSON_KINDS["an integer"](v),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "true or false": lambda v: isinstance(v, bool),
    "an object": lambda v: isinstance(v, dict),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(item, str) for item in v),
}
HF_FIELD_KINDS = {
    "model_type": "a string", "activation_function": "a string",
    "vocab_size": "an integer", "n_positions": "an integer", "n_ctx": "an integer", "n_embd": "an integer",
    "n_layer": "an integer", "n_head": "an integer", "n_inner": "an integer or null",
    "resid_pdrop": "a number", "layer_norm_epsilon": "a number",
    "scale_attn_weights": "true or false", "scale_attn_by_inverse_layer_idx": "true or false",
    "reorder_and_upcast_attn": "true or false", "add_cross_attention": "true or false",
    "tie_word_embeddings": "true or false", "numgpt": "an object",
}




def kind_mismatch(kinds, values):
    """"<field> must be <kind>, got <its JSON>" for the first field of the dict `values` that `kinds`
    ({field: a name in JSON_KINDS}) names and whose value is not of that kind; None when all are."""
    for field, kind in kinds.items():
        if field in values and not JSON_KINDS[kind](values[field]):
            return f"{field} must be {kind}, got {json.dumps(values[field])}"
    return None


# the temporary files atomic_writer makes: tempfile.mkstemp adds 8 characters of [a-z0-9_] to the prefix
TEMP_PREFIX = ".tmp-"
TEMP_FILE = re.compile(re.escape(TEMP_PREFIX) + r"[a-z0-9_]{8}")


@contextlib.contextmanager
def atomic_writer(path):
    """A binary file to write `path` through, all or nothing, so that a reader sees the old file or
    the new one, never a torn one: the block writes a temporary file beside `path`; leaving it
    fsyncs that file, renames it over `path` and fsyncs the directory. An exception or a crash
    half-way leaves the old file, or none. Streams, so a large file need not fit in memory.
    Every OSError of the block, and of the flush, is reported as failing to write `path`: the
    block should do nothing but write to the file."""
    directory = os.path.dirname(os.path.abspath(path))
    failed = f"cannot write {path}"   # what its OSErrors say first: alone, "No space left on device" says not where
    with saying(failed):
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private; give it a normal file's mode
        # saying outside the file: after a failed flush, closing the file flushes again, and that
        # error, which replaces the first, must name the file too
        with saying(failed), os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def fsync_directory(directory):
    """Make a rename in `directory` durable, as POSIX asks: fsync the directory itself. Windows has
    no such call and needs none (NTFS journals the rename); there os.open cannot open a directory
    at all (PermissionError), which would fail every write after its file was already in place."""
    if os.name == "nt":
        return
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path, data):
    """Write the bytes `data` to `path` all or nothing (see atomic_writer)."""
    with atomic_writer(path) as f:
        f.write(data)


def cannot_write_in(directory):
    """Why no file can be made in `directory` ("Permission denied", "Read-only file system"), or None
    when one can: asked before long work, so that work is not lost at its first write."""
    try:
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as e:
        return e.strerror or str(e)
    return None


def remove_stale_temp_files(directory, idle_s=0):
    """Delete the temporary files of atomic writes that a killed process left half-written in
    `directory`; only names of exactly that pattern, so no file of the user's is touched. Where
    other processes may be writing without a lock (the token cache), `idle_s` spares the files
    modified in the last `idle_s` seconds: a live write touches its file every few seconds."""
    now = time.time()
    for entry in os.scandir(directory):
        if TEMP_FILE.fullmatch(entry.name) and entry.is_file() and now - entry.stat().st_mtime >= idle_s:
            # FileNotFoundError: another process's clean-up was first; PermissionError: on Windows,
            # a file that a process still holds open (a run suspended past idle_s) cannot be removed
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.remove(entry.path)


def stored(array):
    """A host array as a file stores it: in C order, little-endian (a copy only where it is not)."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def crc32(array):
    """The CRC-32 of a host array's bytes as a file stores them (see stored)."""
    return zlib.crc32(stored(array))


def tensor_checksums(tensors):
    """{name: CRC-32 of the array's bytes} for the host arrays `tensors`, as a JSON string: the
    metadata entry (CHECKSUMS_KEY) a safetensors file is saved with and checked against on load."""
    return json.dumps({name: crc32(a) for name, a in tensors.items()})


def checksum_problem(tensors, metadata, path):
    """What is wrong with the first of `tensors`, read from the file at `path`, whose bytes differ
    from the CRC-32 that the file's `metadata` recorded when it was saved; or None. Files saved
    without checksums (by transformers, or by an older numgpt) are not checked."""
    recorded = json.loads(metadata.get(CHECKSUMS_KEY, "{}")) if isinstance(metadata, dict) else {}
    damaged = next((name for name, a in tensors.items() if name in recorded and crc32(a) != recorded[name]), None)
    return damaged and (f"{damaged} in {path} is damaged: its bytes do not match the checksum saved with "
                        f"them (the file changed on disk or in a copy)")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def config_to_hf(config):
    """A transformers GPT2Config dictionary for `config`."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": HF_ACTIVATION[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_weights,
        # GPT-2's <|endoftext|> starts and ends text, where the vocabulary has it
        "bos_token_id": 50256 if config.vocab_size > 50256 else None,
        "eos_token_id": 50256 if config.vocab_size > 50256 else None,
        "numgpt": {"bias": config.bias},   # transformers keeps unknown keys and ignores them
    }


def config_from_hf(hf):
    """A GPTConfig from a transformers GPT2Config dictionary, or CheckpointError if we cannot run it."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"config.json describes a {hf.get('model_type')!r} model; numgpt loads GPT-2 models")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in FROM_HF_ACTIVATION:
        raise CheckpointError(f"activation_function {activation!r} is not supported "
                              f"(supported: {', '.join(FROM_HF_ACTIVATION)})")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise CheckpointError(f"n_inner = {hf['n_inner']} is not supported: numgpt's MLP is 4 * n_embd wide")
    if hf.get("layer_norm_epsilon", 1e-5) != 1e-5:
        raise CheckpointError(f"layer_norm_epsilon = {hf['layer_norm_epsilon']} is not supported (GPT-2 uses 1e-5)")
    # (reorder_and_upcast_attn is not among them: it computes the same scores, only in float32;
    # add_cross_attention is: an encoder-decoder's GPT-2, whose extra layers numgpt has not)
    for flag, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
        if hf.get(flag, default) != default:
            raise CheckpointError(f"{flag} = {hf[flag]} is not supported (GPT-2 uses {default})")
    try:
        return GPTConfig(
            vocab_size=hf.get("vocab_size", 50257),
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_layer=hf.get("n_layer", 12),
            n_head=hf.get("n_head", 12),
            n_embd=n_embd,
            dropout=float(hf.get("resid_pdrop", 0.0)),
            bias=hf.get("numgpt", {}).get("bias", True),
            tie_weights=hf.get("tie_word_embeddings", True),
            activation=FROM_HF_ACTIVATION[activation],
        )
    except ConfigError as e:
        raise CheckpointError(f"config.json is not a valid GPT-2 configuration: {e}") from None


def _read_config(path):
    """The config.json at `path` as a dictionary whose fields hold the kinds of value config_from_hf
    expects, or CheckpointError naming the file and the first field that does not."""
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    # ValueError: besides JSONDecodeError (and UnicodeDecodeError), an integer of more digits than Python
    # converts (4300); RecursionError: JSON nested deeper than Python's stack ("[[[[...")
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path}: {e}. Is the checkpoint complete?") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    mismatch = kind_mismatch(HF_FIELD_KINDS, hf)
    if mismatch:
        raise CheckpointError(f"{path}: {mismatch}; correct it or re-save the checkpoint")
    return hf


def _bfloat16_to_float32(bits):
    """bfloat16 is the high half of a float32 (the same sign and exponent, a 7-bit mantissa): its
    16 bits, shifted into the high half of a 32-bit word, are that float32, exactly."""
    wide = bits.astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


# The dtypes a checkpoint's weights may be stored in: safetensors' name -> (the little-endian NumPy
# dtype its bytes are read as, the function that turns those into floats, or None when they are).
# NumPy has no bfloat16, in which many HuggingFace checkpoints are published: it is read as uint16.
SAFETENSORS_FLOATS = {
    "F16": ("<f2", None),
    "BF16": ("<u2", _bfloat16_to_float32),
    "F32": ("<f4", None),
    "F64": ("<f8", None),
}


MAX_HEADER_BYTES = 100_000_000   # safetensors' own limit: a larger size is a damaged file, not a header
# the dtypes numgpt writes, by their little-endian NumPy dtype: SAFETENSORS_FLOATS's that NumPy has
SAFETENSORS_NAMES = {np.dtype(stored): name for name, (stored, to_float) in SAFETENSORS_FLOATS.items()
                     if to_float is None}


def write_safetensors(path, tensors, metadata):
    """Write the host float arrays `tensors` ({name: array}) and the {str: str} `metadata` to `path`
    as a safetensors file (the layout _read_safetensors reads), atomically, tensor after tensor.

    Written here rather than by safetensors.numpy.save, for two reasons: its header lists the
    metadata in an order that changes from save to save, so one model saved twice gave two files,
    where this one is byte for byte the same; and it returns the whole file as one bytes object, a
    second copy of every tensor in memory while a checkpoint is written."""
    header, offset = {"__metadata__": metadata}, 0
    for name, array in tensors.items():
        header[name] = {"dtype": SAFETENSORS_NAMES[array.dtype.newbyteorder("<")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # as safetensors pads it: the tensors start 8-byte aligned
    with atomic_writer(path) as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for array in tensors.values():
            f.write(stored(array).data)


def _read_safetensors(path, skip=()):
    """{name: float NumPy array} from the safetensors file at `path`, in the dtype it was stored in
    (bfloat16 becomes float32), leaving the tensors whose names end with one of `skip` unread; or
    CheckpointError naming what is wrong, a tensor whose bytes fail the file's checksum included.

    We read the format ourselves, as safetensors.numpy cannot read bfloat16: an 8-byte little-endian
    header size, a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}} (and
    "__metadata__"), then the tensors' bytes, their offsets counted from the header's end."""
    if os.path.exists(path) and not os.path.isfile(path):   # opening a FIFO for reading waits for a writer, for ever
        raise CheckpointError(f"cannot read {path}: it is not a regular file (a directory, a FIFO or a device); "
                              f"re-save the checkpoint")
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            header_size = int.from_bytes(f.read(8), "little")
            if not 0 < header_size <= min(file_size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"its header size {header_size} does not fit in the file's {file_size} bytes "
                                 f"(or exceeds safetensors' limit, {MAX_HEADER_BYTES:,})")
            header = json.loads(f.read(header_size), object_pairs_hook=_object_without_repeats)
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
            metadata = header.pop("__metadata__", None)
            _check_layout(header, data_size=file_size - 8 - header_size)
            stored = {name: _read_tensor(f, name, entry, data_start=8 + header_size)
                      for name, entry in header.items() if not name.endswith(skip)}
            damaged = checksum_problem(stored, metadata, path)
            if damaged:
                raise CheckpointError(f"{damaged}; restore the file from a good copy")
            return {name: _float(header[name]["dtype"], array) for name, array in stored.items()}
    # a truncated or foreign file, or a header whose entries lack a field or hold the wrong kind of
    # value; RecursionError: JSON nested deeper than Python's stack ("[[[[...")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path}: {e}. The file is corrupt or not safetensors; "
                              f"re-save the checkpoint") from None


def _object_without_repeats(pairs):
    """A JSON object as a dict, or ValueError when it names a key twice: json.loads would keep the
    last silently, where another reader may keep the first (a second __metadata__ without the
    checksums, a tensor listed twice)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"its header names {repeated!r} twice")
    return obj


def _check_layout(header, data_size):
    """ValueError unless the tensors' data_offsets in `header` ({name: entry}, no __metadata__) lay
    them one after another from the start of the data to the file's end, as safetensors requires
    (and checks, so transformers refuses such a file). Tensors that overlap would be read as many
    times as they are listed: a header of 200 tensors over the same 4 MB took 800 MB to read."""
    spans = []
    for name, entry in header.items():
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(JSON_KINDS["an integer"], offsets))):
            raise ValueError(f"{name}'s data_offsets {json.dumps(offsets)} are not two integers")
        spans.append((*offsets, name))
    end_of_previous = 0
    for begin, end, name in sorted(spans):
        if begin != end_of_previous or end < begin:
            raise ValueError(f"{name}'s data_offsets {[begin, end]} do not follow the previous tensor's, which "
                             f"ends at {end_of_previous} (tensors overlap, or bytes between them belong to none)")
        end_of_previous = end
    if end_of_previous != data_size:
        raise ValueError(f"its tensors' bytes end at {end_of_previous}, but the file holds {data_size} bytes of data")


def _read_tensor(f, name, entry, data_start):
    """The tensor that the header `entry` of the open safetensors file `f` describes, as its bytes
    are stored (bfloat16 as uint16: see _float). Its data_offsets lie within the file (_check_layout)."""
    if entry["dtype"] not in SAFETENSORS_FLOATS:
        raise CheckpointError(f"{name} in {f.name} is stored as {entry['dtype']}, which numgpt cannot read "
                              f"(it reads {', '.join(SAFETENSORS_FLOATS)}): convert the weights to one of them")
    stored = SAFETENSORS_FLOATS[entry["dtype"]][0]
    shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
    count = math.prod(shape)
    if end - begin != count * np.dtype(stored).itemsize:
        raise ValueError(f"{name}'s data_offsets {[begin, end]} do not hold its shape {list(shape)} in "
                         f"{entry['dtype']}")
    f.seek(data_start + begin)
    return np.fromfile(f, dtype=stored, count=count).reshape(shape)


def _float(dtype, array):
    """The floats of an `array` read as safetensors' `dtype` stores it."""
    to_float = SAFETENSORS_FLOATS[dtype][1]
    return array if to_float is None else to_float(array)


def load_config(path):
    """The GPTConfig of a HuggingFace GPT-2 directory, from its config.json alone (the weights
    stay unread): what train.py --init-from checks the flags against before it loads any data."""
    return config_from_hf(_read_checkpoint_config(os.fspath(path)))


def _read_checkpoint_config(path):
    """The config.json of checkpoint directory `path`, checked as _read_config does, after the
    directory itself (_check_checkpoint_dir)."""
    _check_checkpoint_dir(path)
    return _read_config(os.path.join(path, CONFIG_FILE))


def _check_checkpoint_dir(path):
    """CheckpointError unless `path` is a directory holding config.json and model.safetensors (or the
    index of its shards)."""
    if os.path.isfile(path):
        raise CheckpointError(f"{path!r} is a file, not a checkpoint directory: give the directory that holds "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE} (a train.py out-dir)")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist: give a train.py out-dir, or a "
                              f"HuggingFace GPT-2 directory with {CONFIG_FILE} and {WEIGHTS_FILE} on this "
                              f"machine (numgpt does not download models)")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise CheckpointError(f"{path!r} has no {CONFIG_FILE}: a GPT-2 checkpoint needs {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE} (or {INDEX_FILE} and its shards)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in (WEIGHTS_FILE, INDEX_FILE)):
        hint = (" (a pytorch_model.bin is there, which needs torch to read: load the model with "
                "transformers and save_pretrained it again, which writes model.safetensors)"
                if os.path.exists(os.path.join(path, "pytorch_model.bin")) else "")
        raise CheckpointError(f"{path!r} has no {WEIGHTS_FILE}, nor {INDEX_FILE} for shards: a GPT-2 "
                              f"checkpoint needs {CONFIG_FILE} and its weights in safetensors{hint}")


def _weights_files(path):
    """(the file to name in messages about the weights, [the safetensors files that hold them]) of a
    checkpoint directory: model.safetensors, or else the shards that model.safetensors.index.json
    maps the tensors to; CheckpointError when that index cannot be followed."""
    single, index_path = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        return single, [single]
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError, RecursionError) as e:   # as _read_config's
        raise CheckpointError(f"cannot read {index_path}: {e}. Is the checkpoint complete?") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    names = list(weight_map.values()) if isinstance(weight_map, dict) else []
    # a file name alone: an index must not send the reader to files outside its directory
    in_directory = lambda name: isinstance(name, str) and os.path.basename(name) == name and name not in ("", ".", "..")
    if not names or not all(in_directory(name) for name in names):
        raise CheckpointError(f"{index_path} does not map the tensors to shard files in its directory "
                              f"(a \"weight_map\" of names to file names): re-save the checkpoint")
    return index_path, [os.path.join(path, name) for name in sorted(set(names))]


def other_head(hf):
    """"; config.json's architectures names ..." where it names a GPT-2 with another head than the
    language model's (a classifier's, say), whose tensors numgpt has no place for; else ""."""
    names = hf.get("architectures")
    names = [name for name in names if isinstance(name, str)] if isinstance(names, list) else []
    others = [name for name in names if name not in LANGUAGE_MODEL_ARCHITECTURES]
    if not others:
        return ""
    return (f": config.json's architectures names {others[0]}, a GPT-2 with another head than the language "
            f"model's (numgpt loads {' and '.join(LANGUAGE_MODEL_ARCHITECTURES)} checkpoints)")


def load_pretrained(path):
    """(GPTConfig, {name: float NumPy array}) from a HuggingFace GPT-2 directory, its weights in one
    file or in shards. The arrays keep the file's float dtype (bfloat16 becomes float32, exactly);
    GPT converts them to its own."""
    path = os.fspath(path)
    hf = _read_checkpoint_config(path)
    config = config_from_hf(hf)
    weights_path, files = _weights_files(path)
    tensors = {}
    for file in files:
        # the causal masks are buffers, not weights, which some files store as booleans: left unread
        shard = _read_safetensors(file, skip=MASK_BUFFERS)
        repeated = sorted(shard.keys() & tensors.keys())
        if repeated:   # which of the two is the model's?
            raise CheckpointError(f"{file} holds {repeated[0]}, which another shard of {weights_path} holds too")
        tensors.update(shard)
    # one tensor under both names: transformers' GPT2LMHeadModel takes the prefixed one and ignores the
    # other; a dict would keep whichever came last (in safetensors' sorted order, the unprefixed one)
    both = sorted(name for name in tensors if name.startswith(PREFIX) and name.removeprefix(PREFIX) in tensors)
    if both:
        raise CheckpointError(f"{weights_path} holds both {both[0]} and {both[0].removeprefix(PREFIX)}: which is "
                              f"the model's? Remove one and re-save the checkpoint")
    tensors = {name.removeprefix(PREFIX): v for name, v in tensors.items()}
    if config.tie_weights:
        tensors.pop("lm_head.weight", None)   # transformers ties it to wte on load, and so do we
    if not config.bias:
        config, tensors = _drop_zero_biases(config, tensors)

    # the layers are counted first: for a mistyped n_layer of 10**15, param_shapes would list names for ever
    layers = {name.split(".")[1] for name in tensors if name.startswith("h.")}
    if len(layers) != config.n_layer:
        raise CheckpointError(f"{weights_path} holds {counted(len(layers), 'layer')}, but its config.json says "
                              f"n_layer = {config.n_layer}")
    problem = params_mismatch(config, tensors)
    if problem:
        raise CheckpointError(f"{weights_path} does not match its config.json: {problem}{other_head(hf)}")
    params = {name: tensors[name] for name in param_shapes(config)}   # in GPT-2's order, as init_params makes them
    for name, value in params.items():
        if not np.isfinite(value).all():   # a model saved after its training diverged would print gibberish
            raise CheckpointError(f"{name} in {weights_path} holds NaN or infinite numbers: the model it was "
                                  f"saved from had diverged; use an earlier checkpoint")
        if value.dtype == np.float64 and np.abs(value).max(initial=0.0) > np.finfo(np.float32).max:
            # weights this large come only from a diverged run; in float32, the default dtype, they would be inf
            raise CheckpointError(f"{name} in {weights_path} holds numbers beyond float32's range "
                                  f"(|x| > 3.4e38): the model it was saved from had diverged")
    return config, params


def _drop_zero_biases(config, tensors):
    """A bias-free model is saved with zero biases so transformers can load it; drop them again.
    Biases that are no longer zero (the model was fine-tuned elsewhere) are kept, with bias=True."""
    biases = {k: v for k, v in tensors.items() if k.endswith(".bias")}
    if any(np.any(v) for v in biases.values()):
        return GPTConfig(**{**config.to_dict(), "bias": True}), tensors
    return config, {k: v for k, v in tensors.items() if k not in biases}


def save_pretrained(path, config, params):
    """Write config.json and model.safetensors for `config` and host arrays `params` into `path`.
    Params that are not `config`'s (a name missing, a shape wrong) are a ConfigError, before anything
    is written: load_pretrained would refuse the checkpoint, and the directory's previous one is kept."""
    problem = params_mismatch(config, params)
    if problem:
        raise ConfigError(f"params do not match the config: {problem}")
    os.makedirs(path, exist_ok=True)
    tensors = {PREFIX + name: np.ascontiguousarray(value) for name, value in params.items()}
    if not config.bias:   # transformers' GPT-2 always has biases: zeros make it compute the same function
        for name, shape in param_shapes(GPTConfig(**{**config.to_dict(), "bias": True})).items():
            if name.endswith(".bias"):
                tensors[PREFIX + name] = np.zeros(shape, dtype=params["wte.weight"].dtype)
    if "lm_head.weight" in params:
        tensors["lm_head.weight"] = tensors.pop(PREFIX + "lm_head.weight")
    metadata = {"format": "pt", CHECKSUMS_KEY: tensor_checksums(tensors)}   # transformers reads "format" alone
    write_safetensors(os.path.join(path, WEIGHTS_FILE), tensors, metadata)
    atomic_write(os.path.join(path, CONFIG_FILE), (json.dumps(config_to_hf(config), indent=2) + "\n").encode())
