"""Residual connection: y = x + f(x). Its backward hands the same gradient to both paths, which is
why deep residual stacks train: the gradient reaches early layers through the identity path."""


def residual_forward(x, fx):
    """y = x + fx.   x (B,T,C), fx (B,T,C) -> y (B,T,C). No cache is needed."""
    return x + fx


def residual_backward(dy):
    """dx = dy and dfx = dy: addition copies the upstream gradient to both inputs.

    Both are the same array: that is why no backward may modify its incoming gradient in place."""
    return dy, dy
