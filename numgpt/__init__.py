"""numgpt: a GPT-2-style language model in NumPy (and CuPy), every gradient derived by hand.

    import numpy as np
    import numgpt
    model = numgpt.GPT(numgpt.GPTConfig(vocab_size=50257, block_size=64, n_layer=4, n_head=4, n_embd=128))
    idx = np.random.randint(0, 50257, size=(8, 64))   # (B, T) token ids
    targets = np.roll(idx, -1, axis=1)                # the next token at every position
    logits, loss = model.forward(idx, targets)
    grads = model.backward()
    numgpt.AdamW(model.params, lr=1e-3).step(grads)
"""

from numgpt.allocator import keep_freed_memory
from numgpt.config import GPTConfig
from numgpt.errors import CheckpointError, ConfigError, DataError, NumGPTError
from numgpt.model import GPT
from numgpt.optim import AdamW, clip_coefficient, clip_grad_norm, global_norm, no_decay_names

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "AdamW", "clip_coefficient", "clip_grad_norm", "global_norm", "no_decay_names",
           "keep_freed_memory", "NumGPTError", "ConfigError", "CheckpointError", "DataError", "__version__"]
