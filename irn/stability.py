"""Linear stability of four schemes on the test system ``u' = v, v' = -u`` (paper eq. 6, Fig. 2).

One step of size ``h`` of each scheme is linear, ``z_{n+1} = M(h) z_n`` with ``z = (u, v)``:

- forward Euler   ``M = I + h A``                      rho = sqrt(1 + h^2)
- backward Euler  ``M = (I - h A)^{-1}``               rho = 1 / sqrt(1 + h^2)
- trapezoidal     ``M = (I - h/2 A)^{-1} (I + h/2 A)``  rho = 1
- Verlet          ``u+ = u + h v,  v+ = v - h u+``     rho = 1 for h <= 2, > 1 beyond

with ``A = [[0, 1], [-1, 0]]`` (eigenvalues ``+-i``; the exact flow is a rotation).
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("forward_euler", "backward_euler", "trapezoidal", "verlet")
_A = np.array([[0.0, 1.0], [-1.0, 0.0]])


def _check_h(h: float) -> None:
    if not h >= 0:
        raise ValueError(f"h must be >= 0, got {h!r}")


def step_matrix(scheme: str, h: float) -> np.ndarray:
    """The 2x2 matrix ``M(h)`` of one step of ``scheme``, acting on the state ``(u, v)``."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    _check_h(h)
    eye = np.eye(2)
    if scheme == "forward_euler":
        return eye + h * _A
    if scheme == "backward_euler":
        return np.linalg.inv(eye - h * _A)
    if scheme == "trapezoidal":
        return np.linalg.solve(eye - 0.5 * h * _A, eye + 0.5 * h * _A)
    # Verlet: u+ = u + h v, then v+ = v - h u+ = -h u + (1 - h^2) v
    return np.array([[1.0, h], [-h, 1.0 - h * h]])


def spectral_radius(scheme: str, h: float) -> float:
    """``rho(M(h))``, the largest eigenvalue modulus of one step."""
    return float(np.abs(np.linalg.eigvals(step_matrix(scheme, h))).max())


def orbit(scheme: str, h: float, z0, steps: int) -> np.ndarray:
    """``z_0, M z_0, ..., M^steps z_0``: shape ``(steps + 1, 2)``, row 0 is ``z0``."""
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    z0 = np.asarray(z0, dtype=float)
    if z0.shape != (2,):
        raise ValueError(f"z0 must have shape (2,), got {z0.shape}")
    m = step_matrix(scheme, h)
    out = np.empty((steps + 1, 2))
    out[0] = z0
    for n in range(steps):
        out[n + 1] = m @ out[n]
    return out


def exact_orbit(h: float, z0, steps: int) -> np.ndarray:
    """The exact flow sampled at ``t = n h``: ``z(t) = rotation(-t) z0``, shape ``(steps+1, 2)``."""
    _check_h(h)
    t = h * np.arange(steps + 1)
    u0, v0 = np.asarray(z0, dtype=float)
    return np.stack([u0 * np.cos(t) + v0 * np.sin(t), -u0 * np.sin(t) + v0 * np.cos(t)], axis=1)


def theta_amplification(theta: float, z):
    """Amplification factor of the theta-method on ``y' = lambda y``, ``z = h lambda``:
    ``R(z) = (1 + (1 - theta) z) / (1 - theta z)``; stable where ``|R(z)| <= 1``."""
    if not 0 <= theta <= 1:
        raise ValueError(f"theta must be in [0, 1], got {theta!r}")
    z = np.asarray(z, dtype=complex)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (1 + (1 - theta) * z) / (1 - theta * z)
