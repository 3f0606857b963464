"""The examples' training step written in JAX, the compiled reference a user could pick instead
of irn (benchmark-only: `make bench` installs JAX through the `bench` extra; irn never imports
it).

The same mathematics as irn's default path: theta-blocks ``y = x + h((1-theta)F(x) + theta
F(y))`` with ``F(y) = act(W y + b)``; each layer's fixed point in ``lax.while_loop`` with irn's
stopping rule (``max_b ||R_b|| <= tol``, at most ``max_iters`` residual evaluations, output
``G(y*)``), the Neumann backward ``(I - h theta J^T) v = g`` in a ``custom_vjp``; Adam; float64;
the whole step under ``jax.jit``, and ``jax.vmap`` over the members of an ensemble (whose
while-loops then run until the slowest member stops, as irn's ensembles do).
"""

from __future__ import annotations

import os

# one CPU thread, as the irn side of the benchmark
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

jax.config.update("jax_enable_x64", True)

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


def _max_norm(t):
    return jnp.max(jnp.linalg.norm(t, axis=-1))


def theta_layer(h: float, theta: float, activation: str, tol: float, max_iters: int):
    """``layer(W, b, x) -> y``: one implicit block with its implicit (Neumann) backward."""
    act = ACTIVATIONS[activation]

    def F(W, b, y):
        return act(y @ W.T + b)

    def solve(W, b, x):
        explicit = x + h * (1 - theta) * F(W, b, x)

        def g(y):
            return explicit + h * theta * F(W, b, y)

        def cond(state):
            _, _, k, res = state
            return (res > tol) & (k < max_iters)

        def body(state):
            _, gy, k, _ = state
            y = gy
            gy = g(y)
            return y, gy, k + 1, _max_norm(y - gy)

        gx = g(x)
        y, gy, _, _ = lax.while_loop(cond, body, (x, gx, 1, _max_norm(x - gx)))
        return gy, y

    @jax.custom_vjp
    def layer(W, b, x):
        return solve(W, b, x)[0]

    def forward(W, b, x):
        out, y_star = solve(W, b, x)
        return out, (W, b, x, y_star)

    def backward(saved, grad):
        W, b, x, y_star = saved
        _, vjp_y = jax.vjp(lambda y: h * theta * F(W, b, y), y_star)
        threshold = tol * jnp.maximum(1.0, _max_norm(grad))

        def cond(state):
            _, k, res = state
            return (res > threshold) & (k < max_iters)

        def body(state):
            v, k, _ = state
            v_next = grad + vjp_y(v)[0]
            return v_next, k + 1, _max_norm(v_next - v)

        v, _, _ = lax.while_loop(cond, body, (grad, 0, jnp.inf))
        # v through one step x + h(1-theta)F(x) + h theta F(y*), y* held constant
        _, vjp_all = jax.vjp(lambda W_, b_, x_: x_ + h * (1 - theta) * F(W_, b_, x_)
                             + h * theta * F(W_, b_, y_star), W, b, x)
        return vjp_all(v)

    layer.defvjp(forward, backward)
    return layer


def loss_function(workload: dict):
    """``loss(params)`` of ``workload`` (dim, h, theta, activation, tol, max_iters, inputs x,
    targets y, ``loss`` 'mse' (output y_L[1]) or 'cross_entropy' (a linear readout to
    logits)); ``params = {"blocks": [(W_l, b_l), ...], "readout": (W, b)}``."""
    w = workload
    layer = theta_layer(w["h"], w["theta"], w["activation"], w["tol"], w["max_iters"])
    x, y = jnp.asarray(w["x"]), jnp.asarray(w["y"])

    def loss(params):
        state = jnp.pad(x, ((0, 0), (0, w["dim"] - x.shape[1])))
        for W, b in params["blocks"]:
            state = layer(W, b, state)
        if w["loss"] == "mse":
            return jnp.mean((state[:, 1:2] - y) ** 2)
        logits = state @ params["readout"][0].T + params["readout"][1]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return loss


def training_step(workload: dict, lr: float = 1e-5):
    """``state = step(state)``: one Adam step on :func:`loss_function` (not yet jitted)."""
    loss = loss_function(workload)

    def step(state):
        params, m, v, t = state
        grads = jax.grad(loss)(params)
        t = t + 1
        m = jax.tree.map(lambda m_, g: 0.9 * m_ + 0.1 * g, m, grads)
        v = jax.tree.map(lambda v_, g: 0.999 * v_ + 0.001 * g * g, v, grads)
        params = jax.tree.map(lambda p, m_, v_: p - lr * (m_ / (1 - 0.9 ** t))
                              / (jnp.sqrt(v_ / (1 - 0.999 ** t)) + 1e-8), params, m, v)
        return params, m, v, t

    return step


def initial_state(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return params, zeros, zeros, 0


def compiled(step, members: int | None):
    """The jitted step, vmapped over the leading member axis of the state when ``members``."""
    if members is None:
        return jax.jit(step)
    return jax.jit(jax.vmap(step, in_axes=((0, 0, 0, None),), out_axes=(0, 0, 0, None)))
