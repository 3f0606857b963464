"""numba kernels of the compiled CPU path (:mod:`irn.compiled`): a whole network of
``F_l(y) = act(W_l y + b_l)`` theta-blocks, forward and backward, one call each.

The arrays carry a leading member axis (``E = 1`` for one network): states ``Y[l, e]`` of
shape ``(B, d)`` for ``l = 0..L``, the solutions ``Ystar[l, e]``, weights ``W[l, e]``
``(d, d)`` and biases ``bias[l, e]`` ``(d,)``; ``c_exp[l, e] = h(1-theta)``,
``c_imp[l, e] = h theta`` and ``implicit[l, e]`` (whether the member solves at that layer).
Members are independent (each stops on its own, as per-member stopping makes them on the
generic path), so the parallel kernels give each thread whole members. Every loop computes
what the generic path's tensor operations compute, with the same stopping tests
(docs/design.md, sections 2, 3 and 5); only the order of the sums inside a matrix product
may differ (rounding).

Failures go to ``fail[e] = (layer, iteration, kind)`` (kind 1: a non-finite residual, 2: a
singular ``I - J^T``; all ``-1`` when none) and the member stops there; the caller raises
the error that the generic path raises first.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

RELU, TANH, SIGMOID, IDENTITY = 0, 1, 2, 3
ACTIVATION_CODES = {"relu": RELU, "tanh": TANH, "sigmoid": SIGMOID, "identity": IDENTITY}
NEUMANN, DIRECT = 0, 1
NON_FINITE, SINGULAR = 1, 2


@njit(cache=True)
def _affine(WT, bias, y, z):
    """``z = y W^T + b`` from ``WT = W^T`` (contiguous): the innermost loop runs along a row
    of ``W^T`` and of ``z``, which the compiler vectorises (a sum over ``j`` in order, for
    every entry of ``z`` at once)."""
    B, d = y.shape
    for b in range(B):
        for i in range(d):
            z[b, i] = bias[i]
        for j in range(d):
            yj = y[b, j]
            for i in range(d):
                z[b, i] += WT[j, i] * yj


@njit(cache=True)
def _evaluate(WT, bias, y, kind, z, f):
    """``f = F(y) = act(y W^T + b)`` (``z`` receives the pre-activation). ``relu`` keeps a
    NaN, as ``torch.relu`` does."""
    _affine(WT, bias, y, z)
    zero, one = z.dtype.type(0), z.dtype.type(1)
    B, d = y.shape
    # one loop per activation: no branch inside the loops, which the compiler vectorises
    if kind == RELU:
        for b in range(B):
            for i in range(d):
                v = z[b, i]
                f[b, i] = v if (v > zero or v != v) else zero
    elif kind == TANH:
        for b in range(B):
            for i in range(d):
                f[b, i] = math.tanh(z[b, i])
    elif kind == SIGMOID:
        for b in range(B):
            for i in range(d):
                f[b, i] = one / (one + math.exp(-z[b, i]))
    else:
        f[:, :] = z


@njit(cache=True)
def _slope(f, kind, scale, s):
    """``s = scale * act'(z)`` from the values ``f = act(z)`` the forward kept, as the
    generic path writes the derivative (``1 - tanh^2``, ``sigma (1 - sigma)``, the indicator
    of ``z > 0``, which is ``f > 0``)."""
    zero, one = f.dtype.type(0), f.dtype.type(1)
    B, d = f.shape
    for b in range(B):
        for i in range(d):
            v = f[b, i]
            if kind == RELU:
                slope = one if v > zero else zero
            elif kind == TANH:
                slope = one - v * v
            elif kind == SIGMOID:
                slope = v * (one - v)
            else:
                slope = one
            s[b, i] = scale * slope


@njit(cache=True)
def _max_norm(a, b):
    """``max_b ||a_b - b_b||_2`` (NaN when any entry is not finite)."""
    B, d = a.shape
    largest = a.dtype.type(0)
    for k in range(B):
        acc = a.dtype.type(0)
        for i in range(d):
            diff = a[k, i] - b[k, i]
            acc += diff * diff
        norm = math.sqrt(acc)
        if not norm <= largest:  # larger, or NaN (which stays)
            largest = norm
            if norm != norm:
                return norm
    return largest


@njit(cache=True)
def _max_row_norm(a):
    B, d = a.shape
    largest = a.dtype.type(0)
    for k in range(B):
        acc = a.dtype.type(0)
        for i in range(d):
            acc += a[k, i] * a[k, i]
        norm = math.sqrt(acc)
        if not norm <= largest:
            largest = norm
            if norm != norm:
                return norm
    return largest


@njit(cache=True)
def _transpose_product(s, u, W, out):
    """``out = (s * u) W``: ``scale J_F(y)^T u`` per sample for ``s = scale act'(z)``."""
    B, d = u.shape
    for b in range(B):
        for j in range(d):
            out[b, j] = 0
        for i in range(d):
            su = s[b, i] * u[b, i]
            for j in range(d):
                out[b, j] += su * W[i, j]


@njit(cache=True)
def _accumulate_parameters(s, v, y, dW, db):
    """``dW += (s v)^T y``, ``db += sum_b s v``: ``(dF/dW, dF/db)^T (scale v)`` at ``y``."""
    B, d = y.shape
    for b in range(B):
        for i in range(d):
            sv = s[b, i] * v[b, i]
            db[i] += sv
            for j in range(d):
                dW[i, j] += sv * y[b, j]


@njit(cache=True)
def forward_member(e, Y, Ystar, Fx, Fstar, WT, bias, c_exp, c_imp, implicit, kind, tol,
                   max_iters, iters, resid, fail):
    """Member ``e`` through every layer: ``Y[l + 1] = x + h(1-theta)F(x) + h theta F(y*)``,
    ``y*`` by fixed-point iteration from ``x`` (section 2's rule: ``K`` iterations evaluate
    the residuals of ``y^0..y^{K-1}``, ``y* = y^{K-1}``). Keeps ``Fx[l] = F(x)`` and
    ``Fstar[l] = F(y*)`` for the backward (the derivatives of ``act`` follow from them)."""
    L, B, d = WT.shape[0], Y.shape[2], Y.shape[3]
    z, y = np.empty((B, d), Y.dtype), np.empty((B, d), Y.dtype)
    gy, explicit = np.empty((B, d), Y.dtype), np.empty((B, d), Y.dtype)
    for l in range(L):
        x, out, fx, fy = Y[l, e], Y[l + 1, e], Fx[l, e], Fstar[l, e]
        Wl, bl = WT[l, e], bias[l, e]
        ce, ci = c_exp[l, e], c_imp[l, e]
        _evaluate(Wl, bl, x, kind, z, fx)
        if not implicit[l, e]:  # the explicit step x + h F(x)
            for b in range(B):
                for i in range(d):
                    out[b, i] = x[b, i] + ce * fx[b, i]
            Ystar[l, e], fy[:, :] = x, fx
            iters[l, e], resid[l, e] = 0, 0
            continue
        for b in range(B):
            for i in range(d):
                explicit[b, i] = x[b, i] + ce * fx[b, i]
                y[b, i], fy[b, i] = x[b, i], fx[b, i]
        k = 0
        while True:
            for b in range(B):
                for i in range(d):
                    gy[b, i] = explicit[b, i] + ci * fy[b, i]
            k += 1
            res = _max_norm(y, gy)
            if not math.isfinite(res):
                fail[e, 0], fail[e, 1], fail[e, 2] = l, k, NON_FINITE
                return
            if res <= tol[l] or k >= max_iters[l]:
                break
            y[:, :] = gy
            _evaluate(Wl, bl, y, kind, z, fy)
        Ystar[l, e] = y
        out[:, :] = gy
        iters[l, e], resid[l, e] = k, res


@njit(cache=True)
def _solve_dense(A, rhs, out):
    """``out = A^{-1} rhs`` by Gaussian elimination with partial pivoting (as LAPACK's
    ``getrf``/``getrs``); False when a pivot is exactly zero (singular)."""
    n = A.shape[0]
    for i in range(n):
        out[i] = rhs[i]
    for c in range(n):
        p = c
        for r in range(c + 1, n):
            if abs(A[r, c]) > abs(A[p, c]):
                p = r
        if A[p, c] == 0:
            return False
        if p != c:
            for j in range(n):
                A[c, j], A[p, j] = A[p, j], A[c, j]
            out[c], out[p] = out[p], out[c]
        for r in range(c + 1, n):
            m = A[r, c] / A[c, c]
            if m != 0:
                for j in range(c, n):
                    A[r, j] -= m * A[c, j]
                out[r] -= m * out[c]
    for c in range(n - 1, -1, -1):
        acc = out[c]
        for j in range(c + 1, n):
            acc -= A[c, j] * out[j]
        out[c] = acc / A[c, c]
    return True


@njit(cache=True)
def _neumann(s, g, W, threshold, cap, v, work):
    """``v`` solving ``(I - J^T) v = g`` by ``v_{k+1} = g + J^T v_k`` from ``v_0 = g``,
    stopping when ``max_b ||v_{k+1} - v_k|| <= threshold`` or at ``cap`` (``v`` keeps the last
    step). Returns ``(iterations, residual)``; a non-finite residual stops it."""
    B, d = g.shape
    v[:, :] = g
    k = 0
    while True:
        _transpose_product(s, v, W, work)
        for b in range(B):
            for i in range(d):
                work[b, i] += g[b, i]
        k += 1
        res = _max_norm(work, v)
        v[:, :] = work
        if not math.isfinite(res) or res <= threshold or k >= cap:
            return k, res


@njit(cache=True)
def _direct(s, g, W, v, work):
    """``v`` solving ``(I - J^T) v = g`` per sample by a dense solve, and the largest true
    residual ``max_b ||g_b - (I - J^T) v_b||`` (-1 when a system is singular)."""
    B, d = g.shape
    A = np.empty((d, d), g.dtype)
    for b in range(B):
        for j in range(d):  # (I - J^T)[j, i] = delta_ji - W[i, j] s_i
            for i in range(d):
                A[j, i] = (1 if i == j else 0) - W[i, j] * s[b, i]
        if not _solve_dense(A, g[b], v[b]):
            return g.dtype.type(-1)
    _transpose_product(s, v, W, work)  # J^T v
    largest = g.dtype.type(0)
    for b in range(B):
        acc = g.dtype.type(0)
        for i in range(d):
            r = g[b, i] - (v[b, i] - work[b, i])
            acc += r * r
        norm = math.sqrt(acc)
        if not norm <= largest:
            largest = norm
    return largest


@njit(cache=True)
def backward_member(e, Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                    lin_tol, lin_max_iters, dW, db, dX, iters, resid, converged, fail):
    """Member ``e``'s gradients, last layer first: ``G[l]`` is the incoming gradient of state
    ``l``; per layer ``v`` solves ``(I - h theta J_F(y*)^T) v = g`` (``v = g`` for an explicit
    step), then ``dL/dx = v + h(1-theta) J_F(x)^T v`` and
    ``dL/dw = h [(1-theta) dF(x)/dw + theta dF(y*)/dw]^T v`` (section 3)."""
    L, B, d = W.shape[0], Y.shape[2], Y.shape[3]
    s, v, work = np.empty((B, d), Y.dtype), np.empty((B, d), Y.dtype), np.empty((B, d), Y.dtype)
    g = G[L, e].copy()
    for l in range(L - 1, -1, -1):
        x, Wl = Y[l, e], W[l, e]
        if implicit[l, e]:
            largest = _max_row_norm(g)
            threshold = lin_tol[l] * (largest if largest > 1 else 1)  # max(1, .), NaN -> 1
            _slope(Fstar[l, e], kind, c_imp[l, e], s)
            if method[l] == NEUMANN:
                k, res = _neumann(s, g, Wl, threshold, lin_max_iters[l], v, work)
            else:
                k, res = 0, _direct(s, g, Wl, v, work)
                if res < 0:
                    fail[e, 0], fail[e, 1], fail[e, 2] = l, 0, SINGULAR
                    return
            if not math.isfinite(res):
                fail[e, 0], fail[e, 1], fail[e, 2] = l, k, NON_FINITE
                return
            iters[l, e], resid[l, e], converged[l, e] = k, res, res <= threshold
            _accumulate_parameters(s, v, Ystar[l, e], dW[l, e], db[l, e])
        else:
            v[:, :] = g
        _slope(Fx[l, e], kind, c_exp[l, e], s)
        _accumulate_parameters(s, v, x, dW[l, e], db[l, e])
        _transpose_product(s, v, Wl, work)
        for b in range(B):
            for i in range(d):
                g[b, i] = v[b, i] + work[b, i] + G[l, e, b, i]
    dX[e] = g


# one call for every member: serially, or one member per thread (members are independent,
# so both give the same numbers)
@njit(cache=True)
def forward_serial(Y, Ystar, Fx, Fstar, WT, bias, c_exp, c_imp, implicit, kind, tol,
                   max_iters, iters, resid, fail):
    for e in range(Y.shape[1]):
        forward_member(e, Y, Ystar, Fx, Fstar, WT, bias, c_exp, c_imp, implicit, kind, tol,
                       max_iters, iters, resid, fail)


@njit(cache=True, parallel=True)
def forward_parallel(Y, Ystar, Fx, Fstar, WT, bias, c_exp, c_imp, implicit, kind, tol,
                     max_iters, iters, resid, fail):
    for e in prange(Y.shape[1]):
        forward_member(e, Y, Ystar, Fx, Fstar, WT, bias, c_exp, c_imp, implicit, kind, tol,
                       max_iters, iters, resid, fail)


@njit(cache=True)
def backward_serial(Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                    lin_tol, lin_max_iters, dW, db, dX, iters, resid, converged, fail):
    for e in range(Y.shape[1]):
        backward_member(e, Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                        lin_tol, lin_max_iters, dW, db, dX, iters, resid, converged, fail)


@njit(cache=True, parallel=True)
def backward_parallel(Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                      lin_tol, lin_max_iters, dW, db, dX, iters, resid, converged, fail):
    for e in prange(Y.shape[1]):
        backward_member(e, Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                        lin_tol, lin_max_iters, dW, db, dX, iters, resid, converged, fail)
