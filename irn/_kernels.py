"""numba kernels of the compiled CPU path (:mod:`irn.compiled`): a whole network of
``F_l(y) = act(W_l y + b_l)`` theta-blocks, forward and backward, one call each.

The arrays carry a leading member axis (``E = 1`` for one network) and keep the samples
last: states ``Y[l, e]`` of shape ``(d, B)`` for ``l = 0..L`` (the transpose of PyTorch's
``(B, d)``), the solutions ``Ystar[l, e]``, weights ``W[l, e]`` ``(d, d)`` and biases
``bias[l, e]`` ``(d,)``. With the samples last, the innermost loop of every operation runs
over the batch, contiguous and long, which the compiler vectorises; each sum keeps the
order of the ``(B, d)`` loops (over ``j`` for ``W y``, over ``i`` for a norm or ``J^T u``,
over ``b`` for a parameter gradient), so the layout changes no number. ``c_exp[l, e] = h(1-theta)``,
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
FIXED_POINT, ANDERSON = 0, 1
NON_FINITE, SINGULAR = 1, 2


@njit(cache=True)
def _affine(W, bias, y, z):
    """``z = W y + b`` for samples in columns: ``z[i] = b_i + sum_j W_ij y[j]`` (the sum over
    ``j`` in order), a whole row of samples at a time."""
    d, B = y.shape
    for i in range(d):
        bi = bias[i]
        for b in range(B):
            z[i, b] = bi
        for j in range(d):
            w = W[i, j]
            for b in range(B):
                z[i, b] += w * y[j, b]


@njit(cache=True)
def _evaluate(W, bias, y, kind, z, f):
    """``f = F(y) = act(W y + b)`` (``z`` receives the pre-activation). ``relu`` keeps a
    NaN, as ``torch.relu`` does."""
    _affine(W, bias, y, z)
    zero, one = z.dtype.type(0), z.dtype.type(1)
    d, B = y.shape
    # one loop per activation: no branch inside the loops
    if kind == RELU:
        for i in range(d):
            for b in range(B):
                v = z[i, b]
                f[i, b] = v if (v > zero or v != v) else zero
    elif kind == TANH:
        for i in range(d):
            for b in range(B):
                f[i, b] = math.tanh(z[i, b])
    elif kind == SIGMOID:
        for i in range(d):
            for b in range(B):
                f[i, b] = one / (one + math.exp(-z[i, b]))
    else:
        f[:, :] = z


@njit(cache=True)
def _slope(f, kind, scale, s):
    """``s = scale * act'(z)`` from the values ``f = act(z)`` the forward kept, as the
    generic path writes the derivative (``1 - tanh^2``, ``sigma (1 - sigma)``, the indicator
    of ``z > 0``, which is ``f > 0``)."""
    zero, one = f.dtype.type(0), f.dtype.type(1)
    d, B = f.shape
    for i in range(d):
        for b in range(B):
            v = f[i, b]
            if kind == RELU:
                slope = one if v > zero else zero
            elif kind == TANH:
                slope = one - v * v
            elif kind == SIGMOID:
                slope = v * (one - v)
            else:
                slope = one
            s[i, b] = scale * slope


@njit(cache=True)
def _max_norm(a, c, acc):
    """``max_b ||a_b - c_b||_2`` over the sample columns (NaN when any entry is not finite);
    ``acc`` is a work row of ``B``."""
    d, B = a.shape
    acc[:] = 0
    for i in range(d):
        for b in range(B):
            diff = a[i, b] - c[i, b]
            acc[b] += diff * diff
    return _max_excess(acc, acc, False)


@njit(cache=True)
def _max_excess(squares, slack, relative=True):
    """``max_b (sqrt(squares[b]) - slack[b])`` (``max_b sqrt(squares[b])`` unless
    ``relative``): what a relative rule compares with its absolute part (``squares`` the
    squared residual norms, ``slack[b] = rtol ||ref_b||``); a NaN is returned as it is met."""
    largest = -math.inf
    for b in range(squares.shape[0]):
        excess = math.sqrt(squares[b]) - slack[b] if relative else math.sqrt(squares[b])
        if not excess <= largest:  # larger, or NaN (which stays)
            largest = excess
            if excess != excess:
                return excess
    return largest


@njit(cache=True)
def _scaled_norms(a, scale, out):
    """``out[b] = scale ||a_b||_2`` over the sample columns."""
    d, B = a.shape
    out[:] = 0
    for i in range(d):
        for b in range(B):
            out[b] += a[i, b] * a[i, b]
    for b in range(B):
        out[b] = scale * math.sqrt(out[b])


@njit(cache=True)
def _transpose_product(s, u, W, out, su):
    """``out = W^T (s * u)``: ``scale J_F(y)^T u`` per sample for ``s = scale act'(z)`` (the
    sum over ``i`` in order); ``su`` is a work row of ``B``."""
    d, B = u.shape
    out[:, :] = 0
    for i in range(d):
        for b in range(B):
            su[b] = s[i, b] * u[i, b]
        for j in range(d):
            w = W[i, j]
            for b in range(B):
                out[j, b] += su[b] * w


@njit(cache=True)
def _accumulate_parameters(s, v, y, dW, db):
    """``dW += (s v) y^T``, ``db += sum_b s v``: ``(dF/dW, dF/db)^T (scale v)`` at ``y``
    (each a sum over the samples, in order)."""
    d, B = y.shape
    for i in range(d):
        acc_b = db[i]
        for b in range(B):
            acc_b += s[i, b] * v[i, b]
        db[i] = acc_b
        for j in range(d):
            acc = dW[i, j]
            for b in range(B):
                acc += (s[i, b] * v[i, b]) * y[j, b]
            dW[i, j] = acc


@njit(cache=True)
def _mixing_weights(Gs, b, n, regularization, floor, C, a):
    """Anderson's weights for sample ``b``: ``a = M^{-1} 1 / (1^T M^{-1} 1)`` with
    ``M = Gram + max(regularization min_i |R_i|^2, floor) I`` (``Gs[:, :, b]`` holds the
    window's Gram matrix, lower triangle), by a Cholesky solve ``M = C C^T``; False where
    ``M`` is not positive definite."""
    smallest = Gs[0, 0, b]
    for p in range(1, n):
        if Gs[p, p, b] < smallest:
            smallest = Gs[p, p, b]
    ridge = regularization * smallest
    if ridge < floor:
        ridge = floor
    for j in range(n):
        pivot = Gs[j, j, b] + ridge
        for t in range(j):
            pivot -= C[j, t] * C[j, t]
        if not pivot > 0:
            return False
        C[j, j] = math.sqrt(pivot)
        for i in range(j + 1, n):
            entry = Gs[i, j, b]
            for t in range(j):
                entry -= C[i, t] * C[j, t]
            C[i, j] = entry / C[j, j]
    for p in range(n):  # C z = 1, then C^T a = z
        entry = Gs.dtype.type(1)
        for t in range(p):
            entry -= C[p, t] * a[t]
        a[p] = entry / C[p, p]
    total = Gs.dtype.type(0)
    for p in range(n - 1, -1, -1):
        entry = a[p]
        for t in range(p + 1, n):
            entry -= C[t, p] * a[t]
        a[p] = entry / C[p, p]
    for p in range(n):
        total += a[p]
    for p in range(n):
        a[p] = a[p] / total
    return True


@njit(cache=True)
def _anderson_step(y, gy, acc, Rw, Vw, n, head, m, regularization, limit, floor, work):
    """Anderson's step (``irn.solvers.Anderson``) in place of ``y``, per sample: ``g(y)`` and
    ``R = g(y) - y`` join the window (``Rw``, ``Vw``: a ring of ``m`` slots from ``head``,
    ``n`` filled, oldest first), then ``y = sum_i a_i g(y^{k-i})`` (:func:`_mixing_weights`);
    the plain step ``g(y)`` where the sample is within its threshold ``limit[b]`` (``acc``
    holds its squared residual norm), the window has one entry, or the weights' system is not positive
    definite. The Gram matrices and the mixing run over the samples in the inner loop
    (``work``: the caller's scratch arrays, made once per member). Returns the window's
    ``(n, head)``."""
    d, B = y.shape
    if n < m:
        slot = (head + n) % m
        n += 1
    else:
        slot = head
        head = (head + 1) % m
    for i in range(d):
        for b in range(B):
            Rw[slot, i, b] = gy[i, b] - y[i, b]
            Vw[slot, i, b] = gy[i, b]
    if n == 1:
        y[:, :] = gy
        return n, head
    slots, Gs, C, a, weights, plain = work
    for p in range(n):
        slots[p] = (head + p) % m
    for p in range(n):  # each sample's Gram matrix (lower triangle)
        for q in range(p + 1):
            Gs[p, q, :] = 0
            for i in range(d):
                for b in range(B):
                    Gs[p, q, b] += Rw[slots[p], i, b] * Rw[slots[q], i, b]
    for b in range(B):
        plain[b] = not math.sqrt(acc[b]) > limit[b] or not _mixing_weights(
            Gs, b, n, regularization, floor, C, a)
        for p in range(n):
            weights[p, b] = a[p]
    for i in range(d):
        for b in range(B):
            if plain[b]:
                y[i, b] = gy[i, b]
            else:
                mixed = y.dtype.type(0)
                for p in range(n):
                    mixed += weights[p, b] * Vw[slots[p], i, b]
                y[i, b] = mixed
    return n, head


@njit(cache=True)
def forward_member(e, Y, Ystar, Fx, Fstar, W, bias, c_exp, c_imp, implicit, kind, atol,
                   rtol, max_iters, iters, resid, converged, fail, keep, Yk, Fk, means, solver,
                   memory, regularization, floor):
    """Member ``e`` through every layer: ``Y[l + 1] = x + h(1-theta)F(x) + h theta F(y*)``,
    ``y*`` by fixed-point iteration from ``x`` (section 2's rule: ``K`` iterations evaluate
    the residuals of ``y^0..y^{K-1}``, ``y* = y^{K-1}``). Keeps ``Fx[l] = F(x)`` and
    ``Fstar[l] = F(y*)`` for the backward (the derivatives of ``act`` follow from them).
    With ``keep`` (the fixed-point regulariser) also every iterate ``Yk[l, e, k] = y^k``,
    ``Fk[l, e, k] = F(y^k)`` and the batch mean of the residual norms
    ``means[l, k, e] = mean_b ||y^k_b - g(y^k)_b||``. Layers with ``solver[l] == ANDERSON``
    take Anderson's step (:func:`_anderson_step`, window ``memory[l]``) instead of ``g(y)``.
    A layer stops when every sample's ``||R_b|| <= atol[l] + rtol[l] ||y_b||``
    (:class:`irn.config.Stopping`)."""
    L, d, B = W.shape[0], Y.shape[2], Y.shape[3]
    slack, limit, acc = np.zeros(B, Y.dtype), np.empty(B, Y.dtype), np.empty(B, Y.dtype)
    z, y = np.empty((d, B), Y.dtype), np.empty((d, B), Y.dtype)
    gy, explicit = np.empty((d, B), Y.dtype), np.empty((d, B), Y.dtype)
    m = max(1, memory.max())
    Rw, Vw = np.empty((m, d, B), Y.dtype), np.empty((m, d, B), Y.dtype)
    work = (np.empty(m, np.int64), np.empty((m, m, B), Y.dtype), np.empty((m, m), Y.dtype),
            np.empty(m, Y.dtype), np.empty((m, B), Y.dtype), np.empty(B, np.bool_))
    for l in range(L):
        x, out, fx, fy = Y[l, e], Y[l + 1, e], Fx[l, e], Fstar[l, e]
        Wl, bl = W[l, e], bias[l, e]
        ce, ci = c_exp[l, e], c_imp[l, e]
        _evaluate(Wl, bl, x, kind, z, fx)
        if not implicit[l, e]:  # the explicit step x + h F(x)
            for i in range(d):
                for b in range(B):
                    out[i, b] = x[i, b] + ce * fx[i, b]
            Ystar[l, e], fy[:, :] = x, fx
            iters[l, e], resid[l, e], converged[l, e] = 0, 0, True
            continue
        for i in range(d):
            for b in range(B):
                explicit[i, b] = x[i, b] + ce * fx[i, b]
        y[:, :], fy[:, :] = x, fx
        slack[:] = 0  # this layer's own rule (an earlier layer may have been relative)
        k, n, head = 0, 0, 0  # iterations; Anderson's window
        while True:
            for i in range(d):
                for b in range(B):
                    gy[i, b] = explicit[i, b] + ci * fy[i, b]
            if keep:
                Yk[l, e, k], Fk[l, e, k] = y, fy
            k += 1
            res = _max_norm(y, gy, acc)
            if keep:
                total = Y.dtype.type(0)
                for b in range(B):
                    total += math.sqrt(acc[b])
                means[l, k - 1, e] = total / B
            if not math.isfinite(res):
                fail[e, 0], fail[e, 1], fail[e, 2] = l, k, NON_FINITE
                return
            if rtol[l] > 0:  # the relative rule: rtol ||y_b|| in slack (zero for rtol = 0)
                _scaled_norms(y, rtol[l], slack)
            test = _max_excess(acc, slack) if rtol[l] > 0 else res
            if test <= atol[l] or k >= max_iters[l]:
                break
            if solver[l] == ANDERSON:
                limit[:] = atol[l] + slack
                n, head = _anderson_step(y, gy, acc, Rw, Vw, n, head, memory[l],
                                         regularization[l], limit, floor, work)
            else:
                y[:, :] = gy
            _evaluate(Wl, bl, y, kind, z, fy)
        Ystar[l, e] = y
        out[:, :] = gy
        iters[l, e], resid[l, e], converged[l, e] = k, res, test <= atol[l]


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
def _neumann(s, g, W, threshold, slack, relative, cap, v, work, row):
    """``v`` solving ``(I - J^T) v = g`` by ``v_{k+1} = g + J^T v_k`` from ``v_0 = g``,
    stopping when every sample's ``||v_{k+1} - v_k|| <= threshold (+ slack[b], where
    ``relative``)`` or at ``cap`` (``v`` keeps the last step). Returns ``(iterations,
    residual, tested)``, ``tested`` what the rule compared with ``threshold``; a non-finite
    residual stops it."""
    d, B = g.shape
    v[:, :] = g
    k = 0
    while True:
        _transpose_product(s, v, W, work, row)
        for i in range(d):
            for b in range(B):
                work[i, b] += g[i, b]
        k += 1
        res = _max_norm(work, v, row)
        test = _max_excess(row, slack) if relative else res
        v[:, :] = work
        if not math.isfinite(res) or test <= threshold or k >= cap:
            return k, res, test


@njit(cache=True)
def _max_column_norm(a, row):
    """``max_b ||a_b||_2`` over the sample columns (NaN when any is); ``row``: work of ``B``."""
    d, B = a.shape
    row[:] = 0
    for i in range(d):
        for b in range(B):
            row[b] += a[i, b] * a[i, b]
    return _max_excess(row, row, False)


@njit(cache=True)
def _direct(s, g, W, v, work, row):
    """``v`` solving ``(I - J^T) v = g`` per sample by a dense solve, and the largest true
    residual ``max_b ||g_b - (I - J^T) v_b||`` (-1 when a system is singular)."""
    d, B = g.shape
    A = np.empty((d, d), g.dtype)
    rhs, sol = np.empty(d, g.dtype), np.empty(d, g.dtype)
    for b in range(B):
        for j in range(d):  # (I - J^T)[j, i] = delta_ji - W[i, j] s_i
            rhs[j] = g[j, b]
            for i in range(d):
                A[j, i] = (1 if i == j else 0) - W[i, j] * s[i, b]
        if not _solve_dense(A, rhs, sol):
            return g.dtype.type(-1)
        for j in range(d):
            v[j, b] = sol[j]
    _transpose_product(s, v, W, work, row)  # J^T v
    for i in range(d):
        for b in range(B):
            work[i, b] = g[i, b] - (v[i, b] - work[i, b])
    return _max_column_norm(work, row)


@njit(cache=True)
def _through_iterates(e, l, Y, Yk, Fk, gmeans, W, ci, count, kind, dW, db, v, dx, s, a,
                      c, work, row):
    """The gradient of ``sum_k gmeans[l, k, e] * mean_b ||y^k_b - g(y^k)_b||`` through the
    kept iterates ``y^0 = x``, ``y^{k+1} = g(y^k) = explicit + h theta F(y^k)`` of layer ``l``
    (what autograd computes through the generic path's recorded iterates, for ``R_fp``), last
    iterate first: with ``u_k = gmeans_k D_k / (B ||D_k||)`` (zero where ``D_k = 0``) and
    ``c_k = -u_k + a_{k+1}`` the adjoint of ``g(y^k)``, ``a_k = u_k + h theta J_F(y^k)^T c_k``.
    Adds ``h theta (dF(y^k)/dw)^T c_k`` to the parameters' gradients, ``sum_k c_k`` (the
    adjoint of ``explicit``) to ``v`` and ``a_0`` to ``dx``."""
    d, B = v.shape
    a[:, :] = 0
    last = count - 1  # past the last iterate with a gradient every term is zero: skipped
    while last >= 0 and gmeans[l, last, e] == 0:
        last -= 1
    for k in range(last, -1, -1):
        after = Yk[l, e, k + 1] if k + 1 < count else Y[l + 1, e]  # g(y^k)
        y = Yk[l, e, k]
        weight = gmeans[l, k, e] / B
        row[:] = 0
        for i in range(d):
            for b in range(B):
                diff = y[i, b] - after[i, b]
                row[b] += diff * diff
        for b in range(B):
            norm = math.sqrt(row[b])
            row[b] = weight / norm if norm > 0 else 0
        for i in range(d):
            for b in range(B):
                u = row[b] * (y[i, b] - after[i, b])
                c[i, b] = a[i, b] - u
                a[i, b] = u
        _slope(Fk[l, e, k], kind, ci, s)
        _accumulate_parameters(s, c, y, dW, db)
        _transpose_product(s, c, W, work, row)
        for i in range(d):
            for b in range(B):
                a[i, b] += work[i, b]
                v[i, b] += c[i, b]
    for i in range(d):
        for b in range(B):
            dx[i, b] += a[i, b]


@njit(cache=True)
def backward_member(e, Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                    lin_atol, lin_rtol, lin_max_iters, dW, db, dX, iters, resid, converged,
                    fail, keep, Yk, Fk, gmeans, counts):
    """Member ``e``'s gradients, last layer first: ``G[l]`` is the incoming gradient of state
    ``l``; per layer ``v`` solves ``(I - h theta J_F(y*)^T) v = g`` (``v = g`` for an explicit
    step), then ``dL/dx = v + h(1-theta) J_F(x)^T v`` and
    ``dL/dw = h [(1-theta) dF(x)/dw + theta dF(y*)/dw]^T v`` (section 3). With ``keep``, the
    gradient ``gmeans`` of the iterates' residual means (``R_fp``) adds its path through the
    ``counts[l, e]`` kept iterates (:func:`_through_iterates`)."""
    L, d, B = W.shape[0], Y.shape[2], Y.shape[3]
    s, v, work = np.empty((d, B), Y.dtype), np.empty((d, B), Y.dtype), np.empty((d, B), Y.dtype)
    a, c, extra = (np.empty((d, B), Y.dtype), np.empty((d, B), Y.dtype),
                   np.zeros((d, B), Y.dtype))
    row, slack = np.empty(B, Y.dtype), np.zeros(B, Y.dtype)
    g = G[L, e].copy()
    for l in range(L - 1, -1, -1):
        x, Wl = Y[l, e], W[l, e]
        if implicit[l, e]:
            largest = _max_column_norm(g, row)
            threshold = lin_atol[l] * (largest if largest > 1 else 1)  # max(1, .), NaN -> 1
            relative = lin_rtol[l] > 0
            if relative:  # lin_rtol ||g_b||, from the squared norms in row
                for b in range(B):
                    slack[b] = lin_rtol[l] * math.sqrt(row[b])
            _slope(Fstar[l, e], kind, c_imp[l, e], s)
            if method[l] == NEUMANN:
                k, res, test = _neumann(s, g, Wl, threshold, slack, relative, lin_max_iters[l],
                                        v, work, row)
            else:
                k, res = 0, _direct(s, g, Wl, v, work, row)
                if res < 0:
                    fail[e, 0], fail[e, 1], fail[e, 2] = l, 0, SINGULAR
                    return
                test = _max_excess(row, slack) if relative else res
            if not math.isfinite(res):
                fail[e, 0], fail[e, 1], fail[e, 2] = l, k, NON_FINITE
                return
            iters[l, e], resid[l, e], converged[l, e] = k, res, test <= threshold
            _accumulate_parameters(s, v, Ystar[l, e], dW[l, e], db[l, e])
            if keep and counts[l, e] > 0:
                extra[:, :] = 0
                _through_iterates(e, l, Y, Yk, Fk, gmeans, Wl, c_imp[l, e], counts[l, e], kind,
                                  dW[l, e], db[l, e], v, extra, s, a, c, work, row)
        else:
            v[:, :] = g
        _slope(Fx[l, e], kind, c_exp[l, e], s)
        _accumulate_parameters(s, v, x, dW[l, e], db[l, e])
        _transpose_product(s, v, Wl, work, row)
        for i in range(d):
            for b in range(B):
                g[i, b] = v[i, b] + work[i, b] + G[l, e, i, b] + extra[i, b]
        if keep:
            extra[:, :] = 0
    dX[e] = g


# one call for every member: serially, or one member per thread (members are independent,
# so both give the same numbers)
@njit(cache=True)
def forward_serial(Y, Ystar, Fx, Fstar, W, bias, c_exp, c_imp, implicit, kind, atol,
                   rtol, max_iters, iters, resid, converged, fail, keep, Yk, Fk, means, solver,
                   memory, regularization, floor):
    for e in range(Y.shape[1]):
        forward_member(e, Y, Ystar, Fx, Fstar, W, bias, c_exp, c_imp, implicit, kind, atol,
                       rtol, max_iters, iters, resid, converged, fail, keep, Yk, Fk, means,
                       solver, memory, regularization, floor)


@njit(cache=True, parallel=True)
def forward_parallel(Y, Ystar, Fx, Fstar, W, bias, c_exp, c_imp, implicit, kind, atol,
                     rtol, max_iters, iters, resid, converged, fail, keep, Yk, Fk, means,
                     solver, memory, regularization, floor):
    for e in prange(Y.shape[1]):
        forward_member(e, Y, Ystar, Fx, Fstar, W, bias, c_exp, c_imp, implicit, kind, atol,
                       rtol, max_iters, iters, resid, converged, fail, keep, Yk, Fk, means,
                       solver, memory, regularization, floor)


@njit(cache=True)
def backward_serial(Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                    lin_atol, lin_rtol, lin_max_iters, dW, db, dX, iters, resid, converged,
                    fail, keep, Yk, Fk, gmeans, counts):
    for e in range(Y.shape[1]):
        backward_member(e, Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                        lin_atol, lin_rtol, lin_max_iters, dW, db, dX, iters, resid,
                        converged, fail, keep, Yk, Fk, gmeans, counts)


@njit(cache=True, parallel=True)
def backward_parallel(Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                      lin_atol, lin_rtol, lin_max_iters, dW, db, dX, iters, resid, converged,
                      fail, keep, Yk, Fk, gmeans, counts):
    for e in prange(Y.shape[1]):
        backward_member(e, Y, Ystar, Fx, Fstar, G, W, c_exp, c_imp, implicit, kind, method,
                        lin_atol, lin_rtol, lin_max_iters, dW, db, dX, iters, resid,
                        converged, fail, keep, Yk, Fk, gmeans, counts)


@njit(cache=True)
def distances(Y, batch, D):
    """``D[l, e, s, b] = ||Y[l, e, :, (s + 1) B + b] - Y[l, e, :, b]||`` for states ``Y`` of
    shape ``(L + 1, E, d, (S + 1) B)``: the distances of ``S`` perturbed copies of ``B = batch``
    samples to the clean ones (the first ``B``) at every state, for the perturbation
    regulariser (the sum over ``d`` in order)."""
    L1, E, S, B = D.shape
    acc = np.empty(B, Y.dtype)
    for l in range(L1):
        for e in range(E):
            for s in range(S):
                acc[:] = 0
                for i in range(Y.shape[2]):
                    for b in range(B):
                        diff = Y[l, e, i, (s + 1) * B + b] - Y[l, e, i, b]
                        acc[b] += diff * diff
                for b in range(B):
                    D[l, e, s, b] = math.sqrt(acc[b])


@njit(cache=True)
def distances_backward(Y, D, gD, G):
    """Adds to ``G`` (shaped like ``Y``) the gradient of ``sum gD * D`` for the distances of
    :func:`distances`, as autograd's norm writes it: ``diff (gD / D)`` (zero where ``D = 0``)
    to the perturbed copy, its negative to the clean sample."""
    L1, E, S, B = D.shape
    w = np.empty(B, Y.dtype)
    for l in range(L1):
        for e in range(E):
            for s in range(S):
                for b in range(B):
                    w[b] = gD[l, e, s, b] / D[l, e, s, b] if D[l, e, s, b] != 0 else 0
                for i in range(Y.shape[2]):
                    for b in range(B):
                        t = (Y[l, e, i, (s + 1) * B + b] - Y[l, e, i, b]) * w[b]
                        G[l, e, i, (s + 1) * B + b] += t
                        G[l, e, i, b] -= t
