"""irn.stability against the closed forms of the linear test system (paper eq. 6)."""

import numpy as np
import pytest

from irn import stability

H = [0.0, 0.1, 0.5, 1.0, 1.9, 2.0, 2.5, 4.0]


@pytest.mark.parametrize("h", H)
def test_spectral_radii_closed_forms(h):
    assert stability.spectral_radius("forward_euler", h) == pytest.approx(np.sqrt(1 + h * h))
    assert stability.spectral_radius("backward_euler", h) == pytest.approx(1 / np.sqrt(1 + h * h))
    assert stability.spectral_radius("trapezoidal", h) == pytest.approx(1.0)
    # Verlet: lambda^2 - (2 - h^2) lambda + 1 = 0
    roots = np.roots([1.0, -(2 - h * h), 1.0])
    assert stability.spectral_radius("verlet", h) == pytest.approx(np.abs(roots).max())
    if h <= 2:
        assert stability.spectral_radius("verlet", h) == pytest.approx(1.0, abs=1e-7)
    else:
        assert stability.spectral_radius("verlet", h) > 1.0


def test_step_matrices_are_the_schemes():
    h, z = 0.3, np.array([0.7, -0.2])
    u, v = z
    np.testing.assert_allclose(stability.step_matrix("forward_euler", h) @ z, [u + h * v, v - h * u])
    # backward Euler: z+ = z + h A z+
    zb = stability.step_matrix("backward_euler", h) @ z
    np.testing.assert_allclose(zb, z + h * np.array([zb[1], -zb[0]]))
    # trapezoidal: z+ = z + h/2 A (z + z+)
    zt = stability.step_matrix("trapezoidal", h) @ z
    np.testing.assert_allclose(zt, z + h / 2 * np.array([z[1] + zt[1], -z[0] - zt[0]]))
    # Verlet: u+ = u + h v, v+ = v - h u+
    u1 = u + h * v
    np.testing.assert_allclose(stability.step_matrix("verlet", h) @ z, [u1, v - h * u1])
    for scheme in stability.SCHEMES:
        np.testing.assert_allclose(stability.step_matrix(scheme, 0.0), np.eye(2), atol=1e-15)


def test_trapezoidal_conserves_energy_and_euler_schemes_do_not():
    z0 = np.array([1.0, 0.0])
    energy = lambda o: (o ** 2).sum(axis=1)
    np.testing.assert_allclose(energy(stability.orbit("trapezoidal", 0.5, z0, 50)), 1.0)
    fe = energy(stability.orbit("forward_euler", 0.5, z0, 10))
    np.testing.assert_allclose(fe, 1.25 ** np.arange(11))  # |z_n|^2 = (1 + h^2)^n
    be = energy(stability.orbit("backward_euler", 0.5, z0, 10))
    np.testing.assert_allclose(be, 1.25 ** -np.arange(11))


def test_orbit_shape_and_rows():
    o = stability.orbit("verlet", 0.4, [1.0, 0.5], 7)
    assert o.shape == (8, 2)
    np.testing.assert_array_equal(o[0], [1.0, 0.5])
    m = stability.step_matrix("verlet", 0.4)
    np.testing.assert_allclose(o[7], np.linalg.matrix_power(m, 7) @ o[0])


def test_exact_orbit_is_the_rotation():
    o = stability.exact_orbit(np.pi / 2, [1.0, 0.0], 4)
    np.testing.assert_allclose(o, [[1, 0], [0, -1], [-1, 0], [0, 1], [1, 0]], atol=1e-12)


def test_theta_amplification():
    z = np.array([-1.0, 0.5j, -2 + 1j])
    np.testing.assert_allclose(stability.theta_amplification(0.0, z), 1 + z)
    np.testing.assert_allclose(stability.theta_amplification(1.0, z), 1 / (1 - z))
    # trapezoidal is A-stable with |R| = 1 on the imaginary axis
    iy = 1j * np.linspace(-5, 5, 11)
    np.testing.assert_allclose(np.abs(stability.theta_amplification(0.5, iy)), 1.0)
    assert stability.theta_amplification(0.5, z).shape == z.shape
    assert np.iscomplexobj(stability.theta_amplification(0.5, 1.0))


@pytest.mark.parametrize("call", [
    lambda: stability.step_matrix("runge_kutta", 0.1),
    lambda: stability.step_matrix("verlet", -0.1),
    lambda: stability.spectral_radius("trapezoidal", -1.0),
    lambda: stability.orbit("verlet", -0.1, [1.0, 0.0], 3),
    lambda: stability.theta_amplification(1.5, 0.1),
    lambda: stability.theta_amplification(-0.1, 0.1),
])
def test_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_scheme_names():
    assert stability.SCHEMES == ("forward_euler", "backward_euler", "trapezoidal", "verlet")
    with pytest.raises(ValueError, match="forward_euler"):
        stability.step_matrix("rk4", 0.1)
