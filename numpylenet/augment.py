"""Random affine distortions of whole batches: rotation, scale, shear and translation.

LeCun et al. (1998) trained LeNet-5 on "distorted" digits - small random affine transforms of each
training image - and cut its error from 0.95% to 0.8%. This module draws one transform per image
and resamples the whole batch at once, with no per-image Python loop.

The geometry is torchvision's, exactly: :func:`affine` equals
``torchvision.transforms.v2.functional.affine(image, angle, translate, scale, shear,
interpolation=InterpolationMode.BILINEAR, fill=None, center=None)`` on a float image, image by
image, and :func:`random_affine_parameters` draws from the distributions ``transforms.v2.RandomAffine``
draws from (with NumPy's generator instead of torch's).

The transform, about the image centre
-------------------------------------
Pixel (row i, column j) of an H x W image sits at ``x = j - (W - 1)/2, y = i - (H - 1)/2`` in
centred coordinates. The forward map rotates by ``angle`` (clockwise on screen), shears by
``shear`` (x and y, in degrees), scales by ``scale`` and then translates by ``(tx, ty)`` pixels.
Resampling needs the inverse: output pixel p shows the input at ``M^-1 p``. With r = angle, sx, sy
the shears in radians (torchvision's ``_get_inverse_affine_matrix``, centre at 0)::

    a = cos(r - sy) / cos(sy)            b = -(a tan(sx) + sin(r))
    c = sin(r - sy) / cos(sy)            d = cos(r) - c tan(sx)
    [[a, b], [c, d]] = rotation . shear, determinant 1, so its inverse is [[d, -b], [-c, a]]

    M^-1 = [[ d, -b, 0],   / scale,  then  M^-1[:, 2] = -M^-1[:, :2] @ (tx, ty)
            [-c,  a, 0]]

    source column u = M^-1[0] . (x, y, 1) + (W - 1)/2,   source row v = M^-1[1] . (x, y, 1) + (H - 1)/2

Bilinear interpolation, as ``grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=False)``: with ``u0 = floor(u), fu = u - u0`` (likewise v)::

    out = (1-fv) ((1-fu) I[v0, u0] + fu I[v0, u0+1]) + fv ((1-fu) I[v0+1, u0] + fu I[v0+1, u0+1])

where a neighbour outside the image counts as 0. Bilinear interpolation is continuous in (u, v),
so float round-off in the coordinates moves the result by at most that round-off times the
largest step between neighbouring pixels.

Speed: the resampling is a Numba kernel (:mod:`numpylenet.augment_kernels`) when Numba imports,
else the NumPy code here; both compute the formula above and are tested against each other and
against torchvision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .names import DTYPE_NAMES

__all__ = ["AffineRanges", "affine_matrices", "random_affine_parameters", "warp_bilinear",
           "warp_bilinear_numpy", "affine", "random_affine"]


@dataclass(frozen=True)
class AffineRanges:
    """How far :func:`random_affine` may distort: ``transforms.v2.RandomAffine(degrees=degrees,
    translate=(translate, translate), scale=(1 - scale, 1 + scale), shear=shear)``.

    Attributes
    ----------
    degrees : rotation drawn uniformly from [-degrees, degrees]
    translate : fraction of the width (height) bounding the horizontal (vertical) shift; the shift
        is a whole number of pixels, round(uniform(-translate W, translate W)), as torchvision draws it
    scale : zoom factor drawn uniformly from [1 - scale, 1 + scale], 0 <= scale < 1
    shear : shear parallel to the x axis, drawn uniformly from [-shear, shear] degrees
    """

    degrees: float = 0.0
    translate: float = 0.0
    scale: float = 0.0
    shear: float = 0.0

    def __post_init__(self):
        problems = [f"{name} must be a finite number >= 0, got {value}" for name, value in
                    (("degrees", self.degrees), ("shear", self.shear)) if not 0 <= value < math.inf]
        if not 0 <= self.translate <= 1:
            problems.append(f"translate must lie in [0, 1], got {self.translate}")
        if not 0 <= self.scale < 1:
            problems.append(f"scale must lie in [0, 1), got {self.scale}")
        if not self.shear < 90:
            problems.append(f"shear must be < 90 degrees, got {self.shear}")
        if problems:
            raise ValueError("; ".join(problems))


def affine_matrices(angles: np.ndarray, translations: np.ndarray, scales: np.ndarray,
                    shears: np.ndarray) -> np.ndarray:
    """The inverse affine map of every image, in centred pixel coordinates (see the module docstring).

    Parameters
    ----------
    angles : (N,) rotation in degrees, clockwise on screen (rows run downwards), as F.affine's
    translations : (N, 2) shift (tx, ty) in pixels, right and down
    scales : (N,) zoom factors, > 0
    shears : (N, 2) shear angles (sx, sy) in degrees

    Returns
    -------
    float64 ndarray (N, 2, 3): output (x, y, 1) -> input (x, y), both centred
    """
    angles, scales = np.asarray(angles, np.float64), np.asarray(scales, np.float64)
    translations, shears = np.asarray(translations, np.float64), np.asarray(shears, np.float64)
    count = len(angles)
    if angles.shape != (count,) or scales.shape != (count,) or translations.shape != (count, 2) \
            or shears.shape != (count, 2):
        raise ValueError(f"need angles (N,), translations (N, 2), scales (N,), shears (N, 2); got "
                         f"{angles.shape}, {translations.shape}, {scales.shape}, {shears.shape}")
    if not np.all(scales > 0):
        raise ValueError("scales must be > 0")
    # An infinite shift or angle gives NaN coordinates, which the NumPy and Numba warps would each
    # fill in their own way: refuse it here, where both begin.
    if not (np.isfinite(angles).all() and np.isfinite(translations).all() and np.isfinite(scales).all()
            and np.isfinite(shears).all()):
        raise ValueError("angles, translations, scales and shears must be finite")
    rotation, shear_x, shear_y = np.radians(angles), np.radians(shears[:, 0]), np.radians(shears[:, 1])
    a = np.cos(rotation - shear_y) / np.cos(shear_y)
    b = -(a * np.tan(shear_x) + np.sin(rotation))
    c = np.sin(rotation - shear_y) / np.cos(shear_y)
    d = np.cos(rotation) - c * np.tan(shear_x)
    matrices = np.empty((count, 2, 3))
    matrices[:, 0, 0], matrices[:, 0, 1] = d / scales, -b / scales     # [[a, b], [c, d]]^-1 / scale
    matrices[:, 1, 0], matrices[:, 1, 1] = -c / scales, a / scales
    # The shift is undone first: M^-1 p = A^-1 (p - t), so the constant column is -A^-1 t.
    matrices[:, :, 2] = -np.einsum("nij,nj->ni", matrices[:, :, :2], translations)
    return matrices


def random_affine_parameters(count: int, size: tuple[int, int], ranges: AffineRanges,
                             rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """One random transform per image, from the distributions ``transforms.v2.RandomAffine`` uses,
    drawn from ``rng`` (None: a fresh unseeded generator, as ``numpylenet.data``'s random transforms).

    Returns
    -------
    dict with ``angles`` (N,), ``translations`` (N, 2) whole pixels, ``scales`` (N,),
    ``shears`` (N, 2) (the y shear is 0): the arguments of :func:`affine_matrices`
    """
    height, width = size
    rng = rng if rng is not None else np.random.default_rng()
    angles = rng.uniform(-ranges.degrees, ranges.degrees, count)
    limits = np.array([ranges.translate * width, ranges.translate * height])
    # Python's round, as torchvision's int(round(...)): halves go to the even neighbour, as np.rint.
    translations = np.rint(rng.uniform(-limits, limits, (count, 2)))
    scales = rng.uniform(1 - ranges.scale, 1 + ranges.scale, count)
    shears = np.zeros((count, 2))
    shears[:, 0] = rng.uniform(-ranges.shear, ranges.shear, count)
    return {"angles": angles, "translations": translations, "scales": scales, "shears": shears}


def warp_bilinear_numpy(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Resample each image through its inverse affine map, bilinear, zeros outside (pure NumPy).

    Parameters
    ----------
    images : float ndarray (N, H, W)
    matrices : (N, 2, 3), from :func:`affine_matrices`

    Returns
    -------
    ndarray (N, H, W), same dtype as ``images``
    """
    count, height, width = images.shape
    x = np.arange(width) - (width - 1) / 2                              # (W,) centred columns
    y = (np.arange(height) - (height - 1) / 2)[:, np.newaxis]          # (H, 1) centred rows
    m = matrices[:, :, :, np.newaxis, np.newaxis]                       # (N, 2, 3, 1, 1)
    u = m[:, 0, 0] * x + m[:, 0, 1] * y + m[:, 0, 2] + (width - 1) / 2   # (N, H, W) source column
    v = m[:, 1, 0] * x + m[:, 1, 1] * y + m[:, 1, 2] + (height - 1) / 2  # (N, H, W) source row
    u0, v0 = np.floor(u), np.floor(v)
    fu, fv = (u - u0).astype(images.dtype), (v - v0).astype(images.dtype)
    # A one-pixel border of zeros around each image: a neighbour index clipped into [-1, size]
    # then lands either on its pixel or, when it lies outside the image, on a zero.
    bordered = np.zeros((count, height + 2, width + 2), images.dtype)
    bordered[:, 1:-1, 1:-1] = images
    columns = np.clip(u0, -2, width + 1).astype(np.intp)      # clipped first: the cast must not overflow
    rows = np.clip(v0, -2, height + 1).astype(np.intp)
    base = np.arange(count)[:, np.newaxis, np.newaxis] * ((height + 2) * (width + 2))
    flat = bordered.ravel()

    def pixel(row_offset: int, column_offset: int) -> np.ndarray:
        row = np.clip(rows + row_offset, -1, height) + 1
        column = np.clip(columns + column_offset, -1, width) + 1
        return flat[base + row * (width + 2) + column]

    top = (1 - fu) * pixel(0, 0) + fu * pixel(0, 1)
    bottom = (1 - fu) * pixel(1, 0) + fu * pixel(1, 1)
    return (1 - fv) * top + fv * bottom


def warp_bilinear(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """:func:`warp_bilinear_numpy`, run by the Numba kernel when Numba imports.

    Parameters
    ----------
    images : float32 or float64 ndarray (N, H, W)
    matrices : (N, 2, 3), from :func:`affine_matrices`

    Returns
    -------
    ndarray (N, H, W), same dtype as ``images``
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype.name not in DTYPE_NAMES:
        raise ValueError(f"expected {' or '.join(DTYPE_NAMES)} images of shape (N, H, W), got "
                         f"{images.dtype} {images.shape}")
    images = images.astype(images.dtype.newbyteorder("="), copy=False)   # the kernel's byte order
    matrices = np.asarray(matrices, dtype=np.float64)
    if matrices.shape != (len(images), 2, 3):
        raise ValueError(f"need one (2, 3) matrix per image: {len(images)} images, matrices {matrices.shape}")
    try:
        from .augment_kernels import warp_bilinear_kernel
    except ImportError:
        return warp_bilinear_numpy(images, matrices)
    count, height, width = images.shape
    # Fold the centring c and the kernel's frame offset of 1 into the maps, so that they take
    # pixel indices p = (j, i) straight to frame positions: M^-1 (p - c) + c + 1.
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    maps = matrices.copy()
    maps[:, :, 2] += centre + 1 - matrices[:, :, :2] @ centre
    out = np.empty_like(images)
    warp_bilinear_kernel(np.ascontiguousarray(images), maps.astype(images.dtype),
                         np.array([0, 1, width + 1, height + 1], images.dtype), out)
    return out


def affine(images: np.ndarray, angles: np.ndarray, translations: np.ndarray, scales: np.ndarray,
           shears: np.ndarray) -> np.ndarray:
    """Image n through ``F.affine(image, angles[n], translations[n], scales[n], shears[n],
    interpolation=BILINEAR)``, for a float batch (N, H, W) or (N, 1, H, W); same shape and dtype."""
    flat = np.asarray(images)
    if flat.ndim == 4 and flat.shape[1] == 1:
        return affine(flat[:, 0], angles, translations, scales, shears)[:, np.newaxis]
    return warp_bilinear(flat, affine_matrices(angles, translations, scales, shears))


def random_affine(images: np.ndarray, ranges: AffineRanges,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """``transforms.v2.RandomAffine`` (bilinear, fill None) on every image of a float batch
    (N, H, W) or (N, 1, H, W): one random transform per image (:func:`random_affine_parameters`)."""
    size = np.shape(images)[-2:]
    return affine(images, **random_affine_parameters(len(images), size, ranges, rng))
