"""Frame-quality measures for predicted video frames: PSNR and SSIM, in jnp.

Both take images [..., H, W, C] with pixel values in [0, `data_range`] and return
one number per image (shape [...]), so a caller can average them over frames and
sequences as it sees fit.

SSIM follows Wang, Bovik, Sheikh and Simoncelli, "Image quality assessment: from
error visibility to structural similarity" (IEEE TIP 2004): local means, variances
and covariance under an 11x11 Gaussian window of standard deviation 1.5 (weights
normalised to sum to 1; population, not sample, moments), constants
C1 = (0.01 L)^2 and C2 = (0.03 L)^2 for the dynamic range L, the index map

    SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2)
                 / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),

evaluated only where the window lies inside the image ("valid", as in the
authors' reference code) and averaged over positions and channels (mean SSIM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio (dB) per image: 10 log10(L^2 / MSE); inf when equal."""
    mse = jnp.mean(jnp.square(pred - target), axis=(-3, -2, -1))
    return 10.0 * jnp.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D Gaussian weights summing to 1; the 2-D window is their outer product."""
    x = np.arange(size) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _valid_filter_matrix(n: int, window: np.ndarray) -> np.ndarray:
    """[n - k + 1, n]: row i holds the window at offset i, so M @ x filters x ('valid')."""
    k = len(window)
    m = np.zeros((n - k + 1, n), np.float32)
    for i in range(n - k + 1):
        m[i, i : i + k] = window
    return m


def ssim(
    pred: jax.Array,
    target: jax.Array,
    data_range: float = 1.0,
    window_size: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> jax.Array:
    """Mean SSIM per image (see the module docstring); images need H, W >= `window_size`."""
    *_, height, width, _ = pred.shape
    if height < window_size or width < window_size:
        raise ValueError(f"SSIM needs images of at least {window_size}x{window_size} pixels")
    w = gaussian_window(window_size, sigma)
    # the separable Gaussian filter as two small matrices: exact, and any leading axes work
    mh, mw = _valid_filter_matrix(height, w), _valid_filter_matrix(width, w)
    blur = lambda z: jnp.einsum("ih,...hwc,jw->...ijc", mh, z, mw)
    x, y = pred.astype(jnp.float32), target.astype(jnp.float32)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return jnp.mean(index, axis=(-3, -2, -1))
