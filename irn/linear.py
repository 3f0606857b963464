"""The linear solvers of the implicit backward (docs/design.md, section 3).

Each solves ``(I - J^T) v = b`` for the Jacobian ``J`` of the map at the solution, given only
the vector-Jacobian product ``vjp(u) = J^T u``, on states ``(E, B, *)`` with ``active`` (one
bool per member: who solves)::

    solver(vjp, b, *, tol, max_iters, active, rtol=0.0) -> (v, SolveInfo)

stopping per member when every sample's residual ``||b_{e,b} - (I - J^T) v_{e,b}||`` is within
``tol * max(1, max_b ||b_{e,b}||) + rtol ||b_{e,b}||`` (section 1's rule for ``rtol = 0``), with
the driver's stopping rule (:class:`irn.driver.Monitor`).
"""

from __future__ import annotations

import math

import torch

from .driver import Monitor, SolveInfo, failure, per_sample_norm, stops

Tensor = torch.Tensor


def thresholds(b: Tensor, tol: float) -> list[float]:
    """``tol * max(1, max_b ||b_{e,b}||)``, one per member."""
    b = b.detach()  # a differentiable (create_graph) solve still stops on plain numbers
    return [tol * max(1.0, norm) for norm in per_sample_norm(b).amax(dim=1).tolist()]


def neumann(vjp, b, *, tol, max_iters, active, rtol=0.0):
    """Neumann series for ``(I - J^T) v = b``: ``v_0 = b``, ``v_{k+1} = b + J^T v_k``,
    stopping when ``||v_{k+1} - v_k||`` is within the module's rule for every sample
    (``v_{k+1} - v_k`` is the residual of ``v_k``)."""
    monitor = Monitor(thresholds(b, tol), max_iters, active, b.device, rtol=rtol)
    v = b
    while True:
        v_next = b + vjp(v)
        moving = monitor.mask  # members that take this step, the last one included
        stop = monitor.done(v_next - v, b)
        v = v_next if moving is None else monitor.freeze(v_next, v, moving)
        if stop:
            return v, monitor.info()


def gmres(vjp, b, *, tol, max_iters, active, rtol=0.0, restart=30):
    """Matrix-free restarted GMRES for ``(I - J^T) v = b``, all samples at once.

    The operator is block-diagonal over the batch, so each sample has its own Krylov space;
    they are built in lockstep (per-sample inner products, Givens rotations and
    back-substitution), and a sample whose space is exhausted (happy breakdown) just stops
    moving. ``iterations`` counts operator applications in Arnoldi steps. Each member stops on
    its own: it keeps only the Arnoldi steps its own rule asked for (the rest of its rotated
    right-hand side is dropped before the back-substitution), so it computes exactly what it
    computes alone.

    Length: one restart cycle (Arnoldi with modified Gram-Schmidt, Givens rotations,
    back-substitution) shares its state (basis, Hessenberg matrix, rotations, per-member step
    counts) across all its phases; split into functions, each would take and return most of
    it, and the textbook algorithm would no longer read top to bottom."""
    shape = b.shape
    groups = shape[0]
    samples = shape[:2].numel()
    per_group = samples // groups if groups else 0
    b_flat = b.reshape(samples, -1)
    n = b_flat.shape[1]
    limits = thresholds(b, tol)
    # rtol ||b_b||, per sample: the part of each sample's threshold above the member's
    slack = rtol * torch.linalg.vector_norm(b_flat.detach(), dim=1) if rtol else None
    running = [bool(a) for a in active]
    counts, values, tests = [0] * groups, [0.0] * groups, [0.0] * groups

    def operator(v_flat):
        return v_flat - vjp(v_flat.reshape(shape)).reshape(samples, -1)

    def group_max(t):  # (samples,) -> one value per group, on the host
        return t.reshape(groups, -1).amax(dim=1).tolist()

    def tested(t):  # (samples,) residual norms -> what each group's rule compares with tol
        return group_max(t) if slack is None else group_max(t - slack)

    def per_sample(flags):  # one flag per group -> a (samples, 1) mask
        return torch.tensor(flags, device=b.device).repeat_interleave(per_group).unsqueeze(1)

    x = torch.zeros_like(b_flat)
    r = b_flat
    while True:
        beta = torch.linalg.vector_norm(r, dim=1)
        for e, (res, test) in enumerate(zip(group_max(beta), tested(beta))):
            if running[e]:
                values[e], tests[e] = res, test
                running[e] = not stops(test, limits[e], counts[e], max_iters, e)
        if not any(running):
            return x.reshape(shape), SolveInfo(counts, values,
                                               [v <= t for v, t in zip(tests, limits)])
        caps = [min(restart, n, max_iters - c) if go else 0 for c, go in zip(counts, running)]
        m = max(caps)
        basis = [r / torch.where(beta > 0, beta, 1).unsqueeze(1)]
        hess = torch.zeros(samples, m + 1, m, dtype=b.dtype, device=b.device)
        cs = torch.zeros(samples, m, dtype=b.dtype, device=b.device)
        sn = torch.zeros_like(cs)
        s = torch.zeros(samples, m + 1, dtype=b.dtype, device=b.device)
        s[:, 0] = beta
        steps = [0] * groups  # Arnoldi steps each group keeps in this cycle
        going = [cap > 0 for cap in caps]
        for j in range(m):
            w = operator(basis[j])
            for i in range(j + 1):  # modified Gram-Schmidt
                hess[:, i, j] = (w * basis[i]).sum(dim=1)
                w = w - hess[:, i, j, None] * basis[i]
            norm_w = torch.linalg.vector_norm(w, dim=1)
            hess[:, j + 1, j] = norm_w
            basis.append(w / torch.where(norm_w > 0, norm_w, 1).unsqueeze(1))
            for i in range(j):  # apply the earlier rotations to the new column
                top = cs[:, i] * hess[:, i, j] + sn[:, i] * hess[:, i + 1, j]
                hess[:, i + 1, j] = -sn[:, i] * hess[:, i, j] + cs[:, i] * hess[:, i + 1, j]
                hess[:, i, j] = top
            a, c = hess[:, j, j], hess[:, j + 1, j]
            radius = torch.hypot(a, c)
            safe = torch.where(radius > 0, radius, 1)
            cs[:, j] = torch.where(radius > 0, a / safe, 1)
            sn[:, j] = torch.where(radius > 0, c / safe, 0)
            hess[:, j, j] = radius
            hess[:, j + 1, j] = 0
            s[:, j + 1] = -sn[:, j] * s[:, j]
            s[:, j] = cs[:, j] * s[:, j]
            for e, estimate in enumerate(tested(s[:, j + 1].abs())):
                if going[e]:
                    steps[e] = j + 1  # the cycle's cap counts from this member's iterations
                    going[e] = not stops(estimate, limits[e], counts[e] + j + 1,
                                         counts[e] + caps[e], e)
            if not any(going):
                break
        k = max(steps)
        kept = torch.arange(k, device=b.device) < per_sample(steps)  # (samples, k)
        rhs = torch.where(kept, s[:, :k], 0)
        # back-substitution on the rotated (upper-triangular) Hessenberg matrix
        coef = torch.zeros(samples, k, dtype=b.dtype, device=b.device)
        for i in range(k - 1, -1, -1):
            acc = rhs[:, i] - (hess[:, i, i + 1:k] * coef[:, i + 1:k]).sum(dim=1)
            diag = hess[:, i, i]
            coef[:, i] = torch.where(diag != 0, acc / torch.where(diag != 0, diag, 1), 0)
        update = x + sum(coef[:, i, None] * basis[i] for i in range(k))
        x = torch.where(per_sample([k > 0 for k in steps]), update, x)
        counts = [c + k for c, k in zip(counts, steps)]
        r = b_flat - operator(x)  # true residual: restart from it (not an Arnoldi step)


def direct(vjp, b, *, tol, max_iters, active, rtol=0.0):
    """Dense solve of ``(I - J^T) v = b`` per sample: ``J^T`` is assembled from ``n``
    vector-Jacobian products with the unit vectors (all samples at once), then one batched
    ``torch.linalg.solve``. Reports 0 iterations; ``residual`` is the true residual."""
    shape = b.shape
    samples = shape[:2].numel()
    n = b.numel() // max(samples, 1)
    eye = torch.eye(n, dtype=b.dtype, device=b.device)
    # vjp(e_i) is J^T e_i, the i-th column of J^T
    columns = [vjp(eye[i].expand(samples, n).reshape(shape)).reshape(samples, n) for i in range(n)]
    jt = torch.stack(columns, dim=2)  # (samples, n, n) = J^T
    v, singular = torch.linalg.solve_ex(eye - jt, b.reshape(samples, n, 1))
    if bool((singular != 0).any()):  # I - J^T not invertible: no solution to report
        first = int((singular != 0).nonzero()[0, 0])
        raise failure("I - J^T is singular (iteration 0)", first // shape[1])
    with torch.no_grad():  # a statistic, also of a differentiable (create_graph) solve
        residual = torch.linalg.vector_norm(b.reshape(samples, n, 1) - (eye - jt) @ v,
                                            dim=(1, 2))
        if rtol:
            excess = residual - rtol * torch.linalg.vector_norm(b.reshape(samples, n), dim=1)
        values = residual.reshape(shape[0], -1).amax(dim=1).tolist()
        tests = values if not rtol else excess.reshape(shape[0], -1).amax(dim=1).tolist()
    return v.reshape(shape), SolveInfo([0] * shape[0], values,
                                       [stops(v, t, 0, math.inf, e) for e, (v, t)
                                        in enumerate(zip(tests, thresholds(b, tol)))])


#: the linear solvers of the implicit backward by name (``irn.backward`` chooses among them)
LINEAR_SOLVERS = {"neumann": neumann, "gmres": gmres, "direct": direct}
