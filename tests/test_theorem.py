"""Theorem 1's closed form against Monte Carlo and its own consequences; the curve against its definition."""

from __future__ import annotations

import numpy as np
import pytest

from nq_onnx.core import quant
from nq_onnx.search.theorem import expected_noisy_error, noise_width_curve, squared_error

STEP = 0.37


@pytest.mark.parametrize("bits,signed", [(6, True), (4, True), (4, False)])
@pytest.mark.parametrize("width", [0.3, 1.0, 2.5])
def test_closed_form_equals_monte_carlo_inside_and_beyond_the_range(bits, signed, width):
    """Values across the whole code range and past both ends (clipping), noise widths below, at and above one
    step: the closed form equals the mean over 400,000 noise draws to within the draws' own standard error."""
    lo, hi = quant.code_range(bits, signed)
    x = np.linspace((lo - 3.3) * STEP, (hi + 2.7) * STEP, 23).astype(np.float32)
    rng = np.random.default_rng(0)
    noise = ((rng.random((400_000, 1)) - 0.5) * width * STEP).astype(np.float32)
    noisy = x[None, :] + noise
    samples = (quant.fake_quant(noisy, STEP, bits, signed).astype(np.float64) - noisy) ** 2
    mc, se = samples.mean(axis=0), samples.std(axis=0) / np.sqrt(len(noise))
    closed = expected_noisy_error(x, STEP, width * STEP, bits, signed)
    assert np.all(np.abs(closed - mc) <= 5 * se + 1e-9), np.max(np.abs(closed - mc) / (se + 1e-12))


def test_one_step_of_noise_makes_the_error_step_squared_over_12_everywhere_inside_the_range():
    lo, hi = quant.code_range(6)
    x = np.random.default_rng(1).uniform((lo + 1) * STEP, (hi - 1) * STEP, 1000).astype(np.float32)
    np.testing.assert_allclose(expected_noisy_error(x, STEP, STEP, 6), STEP**2 / 12, rtol=1e-9)


def test_noise_lowers_the_error_exactly_where_the_value_sits_far_from_a_level():
    """The theorem's consequence at ``w = s``: the expected error falls below ``e(x)^2`` iff
    ``|e(x)| > s / sqrt(12)``."""
    x = np.linspace(-5 * STEP, 5 * STEP, 2001).astype(np.float32)
    plain = squared_error(x, STEP, 6)
    noisy = expected_noisy_error(x, STEP, STEP, 6)
    margin = np.abs(plain - STEP**2 / 12) > 1e-9  # skip the two boundary points per bin
    assert np.array_equal((noisy < plain)[margin], (plain > STEP**2 / 12)[margin])


def test_vanishing_noise_tends_to_the_plain_error():
    x = np.random.default_rng(2).normal(0, 3 * STEP, 500).astype(np.float32)
    np.testing.assert_allclose(expected_noisy_error(x, STEP, 1e-6 * STEP, 6), squared_error(x, STEP, 6),
                               atol=1e-6 * STEP**2)


def test_curve_measurement_agrees_with_prediction_on_heavy_tailed_activations():
    """A GELU-like heavy-tailed ``[tokens, channels]`` sample (most values near zero, a few large): the measured
    error with one fixed noise value per channel is within 2 % of the prediction at every width, and equals the
    plain quantizer's error at width 0."""
    rng = np.random.default_rng(3)
    x = (rng.standard_t(3, size=(256, 768)) * 0.3).astype(np.float32)
    x = np.maximum(x, -0.17)
    step = float(np.abs(x).max()) / 31 * 0.5
    curve = noise_width_curve(x, step, 6, np.array([0.0, 0.5, 1.0, 1.5, 2.0]), seeds=3)
    assert curve["measured"][0] == pytest.approx(curve["no_noise"], rel=1e-12)
    np.testing.assert_allclose(curve["measured"], curve["predicted"], rtol=0.02)
