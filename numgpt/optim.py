"""AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's update formula, and gradient clipping.

    p <- p (1 - lr wd)                                  decoupled weight decay, skipped for exclude_from_decay
    m <- b1 m + (1 - b1) g                              first moment
    v <- b2 v + (1 - b2) g^2                            second moment
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
"""

import math

from numgpt import foreach, kernels
from numgpt.backend import array_module, cpu_blocks, to_device
from numgpt.errors import ConfigError, is_number


def no_decay_names(params):
    """Names that nanoGPT exempts from weight decay: the parameters of fewer than 2 dimensions, the
    biases and layernorm gains and shifts. Every matrix, the embeddings among them, is decayed.
    Decay pulls weights toward 0: a gain (ideal near 1) or a bias is no scale-free weight matrix,
    and it would only lose by the pull."""
    return {name for name, p in params.items() if p.ndim < 2}


def adamw_update(p, g, m, v, s, decay, b1, b2, bias_correction2_sqrt, eps, step_size):
    """One AdamW step of p, m, v in place from the gradient g (all alike), the formula of the module
    docstring; s is scratch of their size, `decay` = 1 - lr wd (None: no decay), step_size = lr /
    (1 - b1^t). The fused GPU kernel (numgpt.kernels.adamw_all) is its twin."""
    xp = array_module(p)
    if decay is not None:
        p *= decay                                 # p <- p (1 - lr wd)
    xp.subtract(g, m, out=s)                       # m += (1 - b1)(g - m) = b1 m + (1 - b1) g: torch's lerp
    s *= 1.0 - b1
    m += s
    xp.multiply(g, g, out=s)                       # v = b2 v + (1 - b2) g^2
    s *= 1.0 - b2
    v *= b2
    v += s
    xp.sqrt(v, out=s)                              # denom = sqrt(v) / sqrt(1 - b2^t) + eps
    s /= bias_correction2_sqrt
    s += eps
    xp.divide(m, s, out=s)                         # p -= lr / (1 - b1^t) * m / denom
    s *= step_size
    p -= s


class AdamW:
    """opt = AdamW(model.params, lr); opt.step(grads) updates every parameter in place.

    `exclude_from_decay` names parameters that get no weight decay (e.g. no_decay_names(params));
    `lr` may be changed between steps (a schedule sets opt.lr).
    """

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, exclude_from_decay=()):
        # an infinite lr, eps or weight_decay would turn every parameter into NaN, or freeze it
        if not (is_number(lr) and 0 < lr < math.inf):
            raise ConfigError(f"learning rate must be a finite number > 0, got {lr!r}")
        if len(betas) != 2 or not all(is_number(b) and 0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not (is_number(eps) and 0 < eps < math.inf and is_number(weight_decay) and 0 <= weight_decay < math.inf):
            raise ConfigError(f"eps must be finite and > 0 and weight_decay finite and >= 0, got {eps!r}, "
                              f"{weight_decay!r}")
        unknown = set(exclude_from_decay) - set(params)
        if unknown:
            raise ConfigError(f"exclude_from_decay names unknown parameters: {sorted(unknown)[:5]}")
        not_contiguous = [name for name, p in params.items() if not p.flags.c_contiguous]
        if not_contiguous:
            raise ConfigError(f"AdamW updates parameters in place through flat views, so they must be "
                              f"C-contiguous arrays; these are not: {not_contiguous[:5]}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.decay = {name: name not in set(exclude_from_decay) for name in params}
        self.step_count = 0
        self.m = {name: array_module(p).zeros_like(p) for name, p in params.items()}
        self.v = {name: array_module(p).zeros_like(p) for name, p in params.items()}
        self._buffer = None
        self._one = None

    def step(self, grads, grad_scale=None):
        """One update of every parameter from `grads` ({name: array} with params' shapes).

        With `grad_scale` (a number, or a 0-d array on the gradients' device, such as
        clip_coefficient's) the update uses grad_scale * g for each gradient g, as if the gradients
        had been scaled in place first, without a pass of its own and without reading it back.
        A gradient of another shape than its parameter's is a ConfigError: the update works on flat
        views, where a transposed gradient of the same size, or one that broadcasts, would go through."""
        for name, p in self.params.items():
            if grads[name].shape != p.shape:
                raise ConfigError(f"grads[{name!r}] has shape {tuple(grads[name].shape)}, but the parameter "
                                  f"has shape {tuple(p.shape)}")
        self.step_count += 1
        b1, b2 = self.betas
        step_size = self.lr / (1.0 - b1 ** self.step_count)
        bias_correction2_sqrt = math.sqrt(1.0 - b2 ** self.step_count)
        names = list(self.params)
        columns = [[self.params[n] for n in names], [grads[n] for n in names],
                   [self.m[n] for n in names], [self.v[n] for n in names]]
        if foreach.fused(*columns):
            # on a GPU, one kernel updates every parameter; the loop below (adamw_update) is its twin
            xp = array_module(columns[0][0])
            if grad_scale is None:
                if self._one is None:
                    self._one = xp.ones((), dtype=xp.float64)   # made once: a scale of 1 for every unclipped step
                grad_scale = self._one
            scale = xp.asarray(grad_scale, dtype=xp.float64)   # no copy for a float64 0-d array on the device
            kernels.adamw_all(*columns, [self.decay[n] for n in names], scale, 1.0 - self.lr * self.weight_decay,
                              b1, b2, bias_correction2_sqrt, self.eps, step_size)
            return
        for name, p in self.params.items():
            xp = array_module(p)
            decay = 1.0 - self.lr * self.weight_decay if self.decay[name] and self.weight_decay else None
            # in the parameter's dtype, as a gradient scaled in place would be
            scale = None if grad_scale is None else xp.asarray(grad_scale, dtype=p.dtype)
            flat = [a.reshape(-1) for a in (p, grads[name], self.m[name], self.v[name])]   # views
            # on the CPU in cache-sized blocks of p, g, m, v and the scratch (backend.cpu_blocks; GPT-2
            # 124M on 2 cores: 285 -> 205 ms per step)
            for block in cpu_blocks(xp, p.size):
                p_, g, m, v = (a[block] for a in flat)
                # temporaries, reused by every line of the update (a second one for the scaled gradient)
                scratch = self._scratch(xp, p.dtype, p_.size, 1 if scale is None else 2)
                if scale is not None:
                    g = xp.multiply(g, scale, out=scratch[1])
                adamw_update(p_, g, m, v, scratch[0], decay, b1, b2, bias_correction2_sqrt, self.eps, step_size)

    def _scratch(self, xp, dtype, size, rows):
        """`rows` scratch arrays of `size` elements, (rows, size): a view of one buffer, grown when a
        block needs more (on the CPU it never does after the first block)."""
        buf = self._buffer
        have = buf.shape if buf is not None and buf.dtype == dtype else (0, 0)
        if have[0] < rows or have[1] < size:
            self._buffer = buf = xp.empty((max(rows, have[0]), max(size, have[1])), dtype=dtype)
        return buf[:rows, :size]

    def state_dict(self):
        """Everything needed to continue exactly: step count and both moments (arrays are not copied)."""
        return {"step": self.step_count, "m": self.m, "v": self.v}

    def load_state_dict(self, state):
        """Restore a state_dict() in place (arrays, from the host or the device, are copied into this
        optimizer's buffers)."""
        if set(state["m"]) != set(self.m) or set(state["v"]) != set(self.v):
            raise ConfigError("optimizer state does not match the model's parameters")
        for moments, saved in ((self.m, state["m"]), (self.v, state["v"])):
            wrong = next((name for name, buffer in moments.items() if tuple(saved[name].shape) != buffer.shape), None)
            if wrong is not None:   # the copy below would broadcast a (1,) moment over the whole parameter
                raise ConfigError(f"optimizer state does not match the model's parameters: {wrong}'s moment has "
                                  f"shape {tuple(saved[wrong].shape)}, the parameter {moments[wrong].shape}")
        self.step_count = int(state["step"])
        for moments, saved in ((self.m, state["m"]), (self.v, state["v"])):
            for name, buffer in moments.items():
                # CuPy copies a host array into device memory only when asked (to_device)
                buffer[...] = to_device(saved[name], array_module(buffer), dtype=buffer.dtype)


def check_max_norm(max_norm):
    """ConfigError unless max_norm > 0 (inf: never clip): a negative one would flip every gradient's
    sign, and NaN would skip the clipping, silently."""
    if not (is_number(max_norm) and max_norm > 0):
        raise ConfigError(f"max_norm must be a number > 0 (inf never clips), got {max_norm!r}")


def clip_grad_norm(grads, max_norm):
    """Scale all gradients ({name: array}) in place so their global L2 norm is at most max_norm;
    return the norm before clipping (as torch.nn.utils.clip_grad_norm_: coefficient
    max_norm / (norm + 1e-6)).

    The squares are summed in float64 where the gradients are, and read back once: on a GPU, one
    wait for the device, and one kernel launch each for the sum and the scaling. A training loop
    need not wait: clip_coefficient and AdamW.step(grads, grad_scale=...) do the same on the device."""
    check_max_norm(max_norm)
    total = float(global_norm(grads))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        foreach.scale_(list(grads.values()), coef)
    return total


def global_norm(grads):
    """sqrt(sum of the squares of every gradient), as a 0-d float64 value where the gradients are: on a
    GPU, computed without a wait for the device."""
    if not grads:   # the norm of nothing is 0, but where (NumPy or CuPy)? More likely a wrong argument
        raise ConfigError("grads is empty: pass the {name: gradient} dict that model.backward() returns")
    xp = array_module(next(iter(grads.values())))
    return xp.sqrt(foreach.sum_of_squares(list(grads.values())))


def clip_coefficient(grads, max_norm, norm=None):
    """min(1, max_norm / (norm + 1e-6)), the factor clip_grad_norm scales the gradients by, as a
    0-d float64 value where the gradients are: on a GPU, computed without a wait for the device.
    `norm`: global_norm(grads), where the caller has it already (to log it)."""
    check_max_norm(max_norm)
    norm = global_norm(grads) if norm is None else norm
    return array_module(norm).minimum(max_norm / (norm + 1e-6), 1.0)
