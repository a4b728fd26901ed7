"""Generate text with a numgpt model (a train.py out-dir) or any HuggingFace GPT-2 checkpoint.

    python sample.py --ckpt out --prompt "Once upon a time"
    python sample.py --ckpt path/to/gpt2 --prompt-file story.txt --num-samples 3 --temperature 0.8 --top-k 50
    python sample.py --prompt "The cat" --show-tokens --show-probs --max-new-tokens 10
    python sample.py --prompt "The cat sat on the mat" --attention-png attention.png --max-new-tokens 0

The text streams to the terminal as the tokens come. Generation stops at <|endoftext|> unless
--no-stop-at-eot; an empty prompt starts from <|endoftext|>, as a new document would.
"""

import signal

if __name__ == "__main__":
    # until main() takes over, a Ctrl-C ends the program quietly, as any command's does, instead of
    # in a traceback from whichever of NumPy's modules was being imported
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse  # noqa: E402
import io  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from numgpt import console  # noqa: E402
from numgpt.backend import backend_name, to_numpy  # noqa: E402
from numgpt.data.tokenizer import EOT, get_tokenizer  # noqa: E402
from numgpt.errors import ConfigError, DataError, NumGPTError, describe_os_error  # noqa: E402
from numgpt.inspection import (IMAGE_FORMATS, PROBS_HEADER, TextStream, check_image_path,  # noqa: E402
                               plot_attention, probs_row, token_label, token_table)
from numgpt.model import GPT  # noqa: E402
from numgpt.sampling import check_sampling_args, next_token_probs  # noqa: E402

SEPARATOR = "-" * 15
# A prompt is a few thousand characters (GPT-2 sees the last 1024 tokens of it). A file far longer is
# a mistake, such as a training corpus or /dev/zero, that would fill the memory and then the terminal.
MAX_PROMPT_CHARS = 10_000_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate text with a GPT-2-style model.")
    p.add_argument("--ckpt", default="out", help="a train.py out-dir, or a directory with config.json and "
                   "model.safetensors (any HuggingFace GPT-2); default %(default)s")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue; empty (the default) starts a new document")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE, as is ('-': stdin)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="samples to draw, one after the other; default %(default)s")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens per sample; default %(default)s")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="< 1 sharper, > 1 flatter, 0 greedy; default %(default)s")
    p.add_argument("--top-k", type=int, help="draw only from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="draw only from the most likely tokens whose mass reaches p")
    p.add_argument("--seed", type=int, help="seed of the draws, for repeatable samples (default: fresh ones)")
    p.add_argument("--backend", choices=["numpy", "cupy", "auto"], default="numpy",
                   help="array backend; auto uses the GPU when CuPy sees one; default %(default)s")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="default %(default)s")
    p.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false",
                   help="go on past <|endoftext|> (and print it)")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print each sample when it is complete, not token by token")
    g = p.add_argument_group("looking inside")
    g.add_argument("--show-tokens", action="store_true", help="print the prompt's BPE tokens and their ids")
    g.add_argument("--show-probs", action="store_true", help="print, for every generated token, the most likely "
                   "candidates and their probabilities after temperature / top-k / top-p (with temperature 0: "
                   "the softmax, whose most likely token is the one taken)")
    g.add_argument("--attention-png", metavar="FILE", help="write a heatmap of every layer's every head's "
                   f"attention over the prompt to FILE ({', '.join(IMAGE_FORMATS)}; needs matplotlib)")
    return p.parse_args(argv)


def read_prompt(args):
    """The prompt text: --prompt, or the whole of --prompt-file ('-' reads stdin), up to
    MAX_PROMPT_CHARS characters."""
    if args.prompt_file is None:
        return args.prompt
    try:
        if args.prompt_file == "-":
            if sys.stdin is None:   # started with stdin closed (<&-): Python then has no sys.stdin
                raise DataError("--prompt-file - reads the standard input, which is closed")
            if isinstance(sys.stdin, io.TextIOWrapper):
                # UTF-8, as a --prompt-file is read: a pipe is decoded in the locale's encoding (on
                # Windows its ANSI code page, cp1252), which turns "é" into "Ã©" or fails outright
                sys.stdin.reconfigure(encoding="utf-8")
            text = sys.stdin.read(MAX_PROMPT_CHARS + 1)
        else:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read(MAX_PROMPT_CHARS + 1)
    except OSError as e:   # its reason alone: Python's "[Errno 2] ...: 'p.txt'" would repeat the path
        raise DataError(f"cannot read the prompt file {args.prompt_file!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:   # its byte position counts from a chunk of the file, not from its start
        raise DataError(f"cannot read the prompt file {args.prompt_file!r}: it is not UTF-8 text; "
                        f"save it as UTF-8") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise DataError(f"the prompt file {args.prompt_file!r} holds more than {MAX_PROMPT_CHARS:,} characters: "
                        f"give a prompt (the model sees only its last block_size tokens), not a corpus")
    return text.removeprefix("\ufeff")   # a byte-order mark (Windows editors write one) is not the prompt's


def encode_prompt(enc, text, vocab_size):
    """The prompt's token ids; "<|endoftext|>" in the text is the special token, as in training
    data. An empty prompt is the lone <|endoftext|> that starts every document."""
    ids = enc.encode(text, allowed_special={"<|endoftext|>"}) or [EOT]
    too_big = [i for i in ids if i >= vocab_size]
    if too_big:
        start = " (an empty prompt starts from <|endoftext|>)" if not text else ""
        raise ConfigError(f"the prompt holds token {too_big[0]} = {token_label(enc, too_big[0])}{start}, but this "
                          f"model's vocabulary has only {console.counted(vocab_size, 'token')}: use a prompt within it")
    return ids


def write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def sample(model, enc, ids, prompt, rng, args):
    """Draw one sample continuing `ids` and print it: streamed, or whole when done."""
    stream_text = args.stream and not args.show_probs     # --show-probs streams its table instead
    text, decoder = [prompt], TextStream(enc)
    if stream_text:
        write(prompt)
    if args.show_probs:
        print(PROBS_HEADER)
    steps = model.generate_stream(np.array([ids]), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                  seed=rng, with_logits=True)
    for step, (next_ids, logits) in enumerate(steps, start=1):
        token = int(next_ids[0])
        if args.show_probs:
            # greedy draws from a one-hot; the softmax at temperature 1 shows how sure the model was
            probs = next_token_probs(logits, args.temperature or 1.0, args.top_k, args.top_p)[0]
            print(probs_row(enc, step, token, probs), flush=True)
        if args.stop_at_eot and token == EOT:
            break
        text.append(decoder.push(token))
        if stream_text:
            write(text[-1])
    text.append(decoder.flush())                          # an unfinished last character, if any
    if stream_text:
        write(text[-1])
    else:
        write("".join(text))
    print(f"\n{SEPARATOR}", flush=True)


def run(args):
    check_sampling_args(args.temperature, args.top_k, args.top_p, flags=True)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.seed is not None and args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")   # numpy's generators take no negative seeds
    if args.attention_png is not None:                     # "" too: it names no file, and must say so
        check_image_path(args.attention_png)               # before minutes of loading and generating
    prompt = read_prompt(args)
    enc = get_tokenizer()
    model = GPT.from_pretrained(args.ckpt, backend=args.backend, dtype=args.dtype)
    cfg = model.config
    print(f"{args.ckpt}: {model.num_params() / 1e6:.1f}M parameters, {console.counted(cfg.n_layer, 'layer')}, "
          f"{console.counted(cfg.n_head, 'head')}, context {cfg.block_size}, vocabulary {cfg.vocab_size}; "
          f"{backend_name(model.xp)} {model.dtype}", file=sys.stderr)
    ids = encode_prompt(enc, prompt, cfg.vocab_size)
    if len(ids) > cfg.block_size:
        print(f"note: the prompt has {console.counted(len(ids), 'token')}; the model sees the last {cfg.block_size}",
              file=sys.stderr)
    elif len(ids) + args.max_new_tokens > cfg.block_size:
        print(f"note: the prompt and up to {console.counted(args.max_new_tokens, 'new token')} can outgrow the "
              f"context of {cfg.block_size}: past it, each token is drawn seeing the {cfg.block_size} before it",
              file=sys.stderr)
    if args.show_tokens:
        print(f"prompt: {console.counted(len(ids), 'token')}\n{token_table(enc, ids)}\n")
    if args.attention_png:
        window = ids[-cfg.block_size:]
        maps = [to_numpy(att[0]) for att in model.attention_maps(np.array([window]))]   # (nh,T,T) per layer
        plot_attention(maps, [token_label(enc, i) for i in window], args.attention_png)
        print(f"wrote {args.attention_png}: attention of {console.counted(cfg.n_layer, 'layer')} x "
              f"{console.counted(cfg.n_head, 'head')} over {console.counted(len(window), 'prompt token')}",
              file=sys.stderr)
    rng = np.random.default_rng(args.seed)                # one stream of draws across the samples
    for _ in range(args.num_samples):
        sample(model, enc, ids, prompt, rng, args)
    return 0


def main(argv=None):
    signal.signal(signal.SIGINT, signal.default_int_handler)   # the imports are done: Ctrl-C is ours
    args = parse_args(argv)
    if sys.stdout is None:   # started with stdout closed (>&-): the samples would go nowhere
        print("error: the standard output is closed: sample.py has nowhere to write its samples", file=sys.stderr)
        return 1
    sys.stdout, sys.stderr = console.standard_streams()   # their write errors name them (see there)
    try:
        # a model whose arithmetic overflows is reported once, from its logits (numgpt.sampling):
        # NumPy's warnings would come first, each quoting a line of numgpt's code
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return run(args)
    except NumGPTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:          # the reader went away (python sample.py | head): not an error
        return 0
    except OSError as e:             # e.g. --attention-png into a read-only directory
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
