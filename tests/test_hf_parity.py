"""Parity with HuggingFace transformers' GPT2LMHeadModel and torch.optim.AdamW, in float64.

Skipped where torch or transformers is not installed (they are never needed at run time).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (optional reference)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional reference)")

from safetensors.numpy import save_file  # noqa: E402

from numgpt import GPT, AdamW, GPTConfig  # noqa: E402
from numgpt.backend import to_numpy  # noqa: E402
from numgpt.data.tokenizer import decode, encode, write_hf_tokenizer  # noqa: E402
from numgpt.errors import CheckpointError  # noqa: E402

V, T = 97, 16
PARITY = 1e-12   # relative error allowed against transformers in float64


def rel_err(a, b):
    """Tensor-scale relative error max|a - b| / max|b|."""
    a, b = np.asarray(to_numpy(a), dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tiny_hf_model(seed=0, **overrides):
    """A random float64 GPT-2 with every parameter perturbed away from its init (so layernorm gains,
    biases and positions all carry signal)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=24, n_layer=2, n_head=3,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def save_openai_style(hf, path):
    """Write hf's weights as OpenAI's GPT-2 on the hub has them: no "transformer." prefix, no
    lm_head, and the causal-mask buffers attn.bias / attn.masked_bias."""
    tensors = {k[len("transformer."):]: v.detach().numpy() for k, v in hf.state_dict().items()
               if k.startswith("transformer.")}
    for i in range(hf.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T)))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4)
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    hf.config.to_json_file(str(path / "config.json"))


@pytest.fixture(params=["transformers", "openai"])
def checkpoint_pair(request, tmp_path):
    """(transformers model, path of the same weights saved in one key style)."""
    hf = tiny_hf_model()
    path = tmp_path / request.param
    if request.param == "transformers":
        hf.save_pretrained(str(path))
    else:
        save_openai_style(hf, path)
    return hf, path


def hf_loss_and_grads(hf, idx, targets):
    """Logits, mean loss and {our name: grad} from transformers (targets already shifted, as ours)."""
    hf.zero_grad()
    logits = hf(torch.tensor(idx)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.tensor(targets).reshape(-1))
    loss.backward()
    grads = {name.removeprefix("transformer."): p.grad.numpy().copy() for name, p in hf.named_parameters()}
    return logits.detach().numpy(), loss.item(), grads


def test_logits_loss_and_gradients_match(checkpoint_pair, backend):
    hf, path = checkpoint_pair
    model = GPT.from_pretrained(path, backend=backend, dtype="float64").eval()
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, V, size=(3, T)), rng.integers(0, V, size=(3, T))
    logits, loss = model.forward(idx, targets)
    grads = model.backward()
    ref_logits, ref_loss, ref_grads = hf_loss_and_grads(hf, idx, targets)
    # measured: 7.5e-16 on the logits, 0 on the loss, 1.0e-15 on the worst gradient; the bound
    # leaves a thousand times that for other BLAS orders, and fails any term that is really off
    assert rel_err(logits, ref_logits) < PARITY
    assert abs(loss - ref_loss) / ref_loss < PARITY
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < PARITY, name


@pytest.mark.parametrize("ignored", ["some", "all"])
def test_ignored_targets_match_torch(tmp_path, backend, ignored):
    """Targets of -100 leave the mean (its count too), as in torch's cross_entropy; with none left
    the loss is nan and every gradient 0 in both. The gradient check cannot see a wrong count:
    forward and backward would share it."""
    hf = tiny_hf_model()
    hf.save_pretrained(str(tmp_path))
    model = GPT.from_pretrained(tmp_path, backend=backend, dtype="float64").eval()
    rng = np.random.default_rng(4)
    idx, targets = rng.integers(0, V, size=(2, T)), rng.integers(0, V, size=(2, T))
    targets[rng.random(targets.shape) < 0.4] = -100
    if ignored == "all":
        targets[:] = -100
    _, loss = model.forward(idx, targets)
    grads = model.backward()
    _, ref_loss, ref_grads = hf_loss_and_grads(hf, idx, targets)
    if ignored == "all":
        assert np.isnan(loss) and np.isnan(ref_loss)
        assert all(not np.any(to_numpy(g)) and not np.any(ref_grads[name]) for name, g in grads.items())
        return
    assert abs(loss - ref_loss) / ref_loss < PARITY
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < PARITY, name


def test_twenty_adamw_steps_track_torch(checkpoint_pair, backend):
    hf, path = checkpoint_pair
    model = GPT.from_pretrained(path, backend=backend, dtype="float64").train()
    opt = AdamW(model.params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(hf.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx, targets = rng.integers(0, V, size=(2, T)), rng.integers(0, V, size=(2, T))
        model.forward(idx, targets, return_logits=False)
        opt.step(model.backward())
        hf_loss_and_grads(hf, idx, targets)
        ref_opt.step()
    for name, p in hf.named_parameters():
        assert rel_err(model.params[name.removeprefix("transformer.")], p.detach().numpy()) < 1e-6, name


def test_the_residual_stream_is_transformers_hidden_states_before_ln_f(checkpoint_pair):
    hf, path = checkpoint_pair
    idx = np.random.default_rng(5).integers(0, V, size=(2, T))
    hidden = hf(torch.tensor(idx), output_hidden_states=True).hidden_states
    stream = GPT.from_pretrained(path, dtype="float64").residual_stream(idx)
    for ours, theirs in zip(stream[:-1], hidden[:-1]):   # transformers' last is after ln_f
        assert rel_err(ours, theirs.detach().numpy()) < PARITY
    assert len(stream) == len(hidden)


def test_greedy_generation_matches(checkpoint_pair, backend):
    hf, path = checkpoint_pair
    model = GPT.from_pretrained(path, backend=backend, dtype="float64")
    prompt = np.random.default_rng(2).integers(0, V, size=(2, 5))
    ours = to_numpy(model.generate(prompt, 20, temperature=0))   # 25 > T = 16: the window slides
    ref = hf.generate(torch.tensor(prompt), max_new_tokens=11, do_sample=False, pad_token_id=0,
                      attention_mask=torch.ones(prompt.shape, dtype=torch.long))
    np.testing.assert_array_equal(ours[:, :16], ref.numpy())


def test_transformers_reads_the_tokenizer_of_an_out_dir(tmp_path):
    """train.py writes GPT-2's tokenizer files beside the model: transformers' AutoTokenizer then
    tokenizes as numgpt does, and pipeline() continues text as sample.py does (without the files it
    made an empty tokenizer and returned the prompt unchanged, with no error)."""
    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16), seed=0).eval()
    model.save_pretrained(tmp_path)
    assert write_hf_tokenizer(tmp_path)
    text = "Once upon a time, naïve Zoë said: “héllo” 🙂\n\n   spaces\tand tabs"
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path))(text).input_ids == encode(text)
    prompt = "Once upon a time"
    ids = model.generate(np.array([encode(prompt)]), max_new_tokens=6, temperature=0)[0]
    generated = transformers.pipeline("text-generation", model=str(tmp_path))(
        prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert generated == decode(ids) != prompt


def test_a_checkpoint_transformers_saved_in_shards_loads(tmp_path):
    """A model above save_pretrained's max_shard_size (5 GB by default: GPT-2 XL in float32) is saved
    as shards and an index; here a tiny one, cut into shards of 20 KB."""
    hf = tiny_hf_model()
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    idx = torch.tensor(np.random.default_rng(2).integers(0, V, size=(2, T)))
    logits = GPT.from_pretrained(tmp_path, dtype="float64").forward(idx.numpy())[0]
    assert rel_err(logits, hf(idx).logits.detach().numpy()) < PARITY


def test_the_body_alone_loads_as_the_language_model_transformers_makes_of_it(tmp_path):
    """A GPT2Model checkpoint (no head) is a language model whose output layer is the tied wte, as
    transformers' GPT2LMHeadModel.from_pretrained makes of it."""
    hf = tiny_hf_model()
    hf.transformer.save_pretrained(str(tmp_path))
    idx = torch.tensor(np.random.default_rng(4).integers(0, V, size=(2, T)))
    logits = GPT.from_pretrained(tmp_path, dtype="float64").forward(idx.numpy())[0]
    assert rel_err(logits, hf(idx).logits.detach().numpy()) < PARITY


@pytest.mark.parametrize("architecture, head", [("GPT2ForSequenceClassification", "score.weight"),
                                                ("GPT2ForTokenClassification", "classifier.weight")])
def test_a_gpt2_with_another_head_is_named_by_its_architecture(tmp_path, architecture, head):
    config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=24, n_layer=2, n_head=3)
    getattr(transformers, architecture)(config).save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=rf"unexpected \[.*'{head}'\]: config.json's architectures names "
                                              rf"{architecture}, a GPT-2 with another head"):
        GPT.from_pretrained(tmp_path)


def test_upcast_and_reordered_attention_loads_as_the_same_function(tmp_path):
    """reorder_and_upcast_attn (set by GPT-2s trained in float16, such as Stanford CRFM's) computes
    the same attention scores, in float32; numgpt computes them in its own dtype. transformers takes
    that path only in eager attention, and there refuses float64 (its float64 mask upcasts the scores):
    the flagged model runs in float32 (measured: 3.0e-7 from numgpt's float64 logits)."""
    upcast = tiny_hf_model(reorder_and_upcast_attn=True, attn_implementation="eager")
    upcast.save_pretrained(str(tmp_path))
    model = GPT.from_pretrained(tmp_path, dtype="float64")
    idx = torch.tensor(np.random.default_rng(1).integers(0, V, size=(2, T)))
    logits = model.forward(idx.numpy())[0]
    assert rel_err(logits, tiny_hf_model()(idx).logits.detach().numpy()) < PARITY   # the same weights, unflagged
    assert rel_err(logits, upcast.float()(idx).logits.detach().numpy()) < 1e-5     # a refused variant is 3e-2 off


@pytest.mark.parametrize("config", [
    GPTConfig(vocab_size=V, block_size=T, n_layer=2, n_head=2, n_embd=8),
    GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=4, n_embd=8, tie_weights=False, activation="relu"),
    GPTConfig(vocab_size=V, block_size=T, n_layer=1, n_head=1, n_embd=6, bias=False, activation="gelu_exact"),
], ids=["gpt2", "untied-relu", "nobias-exactgelu"])
def test_transformers_loads_what_we_save(config, tmp_path):
    model = GPT(config, dtype="float64", seed=5)
    for p in model.params.values():   # move off the init so every parameter matters
        p += np.random.default_rng(0).normal(0.0, 0.1, size=p.shape)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    idx = np.random.default_rng(3).integers(0, V, size=(2, T))
    assert rel_err(model.eval().forward(idx)[0], hf(torch.tensor(idx)).logits.detach().numpy()) < 1e-10
    again = GPT.from_pretrained(tmp_path, dtype="float64")
    assert again.config == config
    for name, p in model.params.items():
        np.testing.assert_array_equal(to_numpy(again.params[name]), to_numpy(p))


def nanogpt_lr(it, lr, min_lr, warmup_iters, max_iters):
    """nanoGPT's get_lr, written out here rather than imported: warmup to lr over warmup_iters, then
    a cosine from lr down to min_lr at max_iters."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    ratio = (it - warmup_iters) / (max_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("tie_weights", [True, False], ids=["tied", "untied"])
def test_the_training_loop_is_torchs(tmp_path, tie_weights):
    """train.py's whole loop (Trainer.setup and run, in float64) against the PyTorch loop it stands
    for, from the same initial weights on the batches the trainer drew: GPT2LMHeadModel, the loss
    of each of --grad-accum micro-batches divided by their number and backpropagated into the same
    gradients, clip_grad_norm_, nanoGPT's schedule set per step, torch.optim.AdamW with nanoGPT's two
    groups (decay for the parameters of 2 or more dimensions, none for the rest). Every step's loss,
    grad norm and rate in log.jsonl, and the final weights, moments and step count, must agree.

    Measured over 200 steps of a 2-layer, 16-wide model (clipping on every step, on some, off;
    grad-accum 3; untied): params and moments within 2e-12 of torch's (tensor-scale), losses within
    3e-15, grad norms within 3e-12, with no growth; the default 4-layer, 128-wide shape stays within
    1e-12 over 88 steps. The bounds below leave ~500x. Each of these mistakes fails it, by 1e-10 to
    1 (checked): a bias correction a step off, eps inside the square root or divided by the bias
    correction, biases or layernorms decayed, embeddings not decayed, decay after the update or at
    the peak rate, the schedule a step late or warmup from 0, clipping without its 1e-6, or of the
    last micro-batch's norm, micro-batch gradients summed instead of averaged."""
    from numgpt.training import TrainConfig, Trainer, read_log

    text = tmp_path / "stories.txt"
    rng = np.random.default_rng(0)
    words = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "happy", "sad", "big", "red", "sun", "and", "then"]
    text.write_text("\n<|endoftext|>\n".join(" ".join(rng.choice(words, size=60)) + "." for _ in range(40)))
    cfg = TrainConfig(data=[str(text)], out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"),
                      n_layer=2, n_head=2, n_embd=8, block_size=8, batch_size=2, grad_accum=2, max_iters=24,
                      warmup_iters=4, lr=3e-2, beta2=0.95, weight_decay=0.1, grad_clip=1.5, tie_weights=tie_weights,
                      eval_interval=1000, eval_iters=1, num_samples=0, dtype="float64")
    with Trainer(cfg, log=lambda message: None, progress=False) as trainer:
        trainer.setup()
        init = {name: to_numpy(p).copy() for name, p in trainer.model.params.items()}
        batches, next_batch = [], trainer.batcher.next_batch
        trainer.batcher.next_batch = lambda: batches.append(next_batch()) or batches[-1]
        assert trainer.run() == "done"
    rows = [row for row in read_log(tmp_path / "out" / "log.jsonl") if "loss" in row]

    config = transformers.GPT2Config(vocab_size=trainer.model.config.vocab_size, n_positions=cfg.block_size,
                                     n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, tie_word_embeddings=tie_weights)
    hf = transformers.GPT2LMHeadModel(config).double().train()
    params = {name.removeprefix("transformer."): p for name, p in hf.named_parameters()}
    assert set(params) == set(init)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(init[name]))
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8)
    assert len(batches) == cfg.max_iters * cfg.grad_accum and len(rows) == cfg.max_iters
    clipped = 0
    for step, row in enumerate(rows):
        opt.zero_grad()
        loss = 0.0
        for x, y in batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]:
            micro = torch.nn.functional.cross_entropy(hf(torch.from_numpy(x)).logits.flatten(0, 1),
                                                      torch.from_numpy(y).flatten()) / cfg.grad_accum
            micro.backward()
            loss += micro.item()
        norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), cfg.grad_clip).item()
        clipped += norm > cfg.grad_clip
        lr = nanogpt_lr(step, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        assert row["step"] == step + 1
        assert row["lr"] == pytest.approx(lr, rel=1e-14, abs=0), step
        assert row["loss"] == pytest.approx(loss, rel=1e-12, abs=0), step
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-10, abs=0), step
    assert 0 < clipped < cfg.max_iters   # both branches of clipping were taken
    state = trainer.optimizer.state_dict()
    assert state["step"] == cfg.max_iters == opt.state[params["wte.weight"]]["step"]
    for name, p in params.items():
        assert rel_err(trainer.model.params[name], p.detach().numpy()) < 1e-9, name
        assert rel_err(state["m"][name], opt.state[p]["exp_avg"].numpy()) < 1e-9, name
        assert rel_err(state["v"][name], opt.state[p]["exp_avg_sq"].numpy()) < 1e-9, name
