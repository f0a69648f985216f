"""numpylenet.augment against torchvision.transforms.v2 and hand-computed cases.

Tolerances. In float64 both sides compute the same formula in double precision, so they agree to
round-off: 1e-12 on pixels in [0, 1]. In float32 torchvision computes the source coordinates in
float32 (its grid is ``linspace`` in float32 times theta / (W / 2), then ``grid_sample``
un-normalises it), with round-off of a few ulp of 32, about 1e-5 pixel; bilinear interpolation
is continuous with slope at most max|I[k+1] - I[k]| <= 1 per pixel for images in [0, 1], so the
pixels may differ by about 1e-5. 5e-5 leaves a margin of 5; a wrong matrix, a flipped sign, a
half-pixel offset or a wrong border all show up as errors of order 0.1 to 1.
"""

import numpy as np
import pytest

from numpylenet import augment
from numpylenet.augment import AffineRanges

torch = pytest.importorskip("torch")
v2 = pytest.importorskip("torchvision.transforms.v2")
F = v2.functional
BILINEAR = v2.InterpolationMode.BILINEAR
TOLERANCE = {np.float64: 1e-12, np.float32: 5e-5}

pytestmark = pytest.mark.usefixtures("single_thread")

# (angle, (tx, ty), scale, (shear x, shear y)) covering each part of the map alone, then together.
CASES = {
    "identity": (0.0, (0.0, 0.0), 1.0, (0.0, 0.0)),
    "rotate": (17.0, (0.0, 0.0), 1.0, (0.0, 0.0)),
    "rotate_negative_large": (-135.0, (0.0, 0.0), 1.0, (0.0, 0.0)),
    "translate_whole": (0.0, (3.0, -2.0), 1.0, (0.0, 0.0)),
    "translate_fraction": (0.0, (1.3, 0.6), 1.0, (0.0, 0.0)),
    "zoom_in": (0.0, (0.0, 0.0), 1.3, (0.0, 0.0)),
    "zoom_out": (0.0, (0.0, 0.0), 0.7, (0.0, 0.0)),
    "shear_x": (0.0, (0.0, 0.0), 1.0, (20.0, 0.0)),
    "shear_y": (0.0, (0.0, 0.0), 1.0, (0.0, -15.0)),
    "everything": (-11.0, (-2.5, 1.0), 1.12, (8.0, 5.0)),
}


def torch_affine(image: np.ndarray, angle, translate, scale, shear) -> np.ndarray:
    """torchvision's F.affine on one (H, W) image, bilinear, fill None."""
    result = F.affine(torch.from_numpy(image[np.newaxis].copy()), angle=float(angle),
                      translate=[float(t) for t in translate], scale=float(scale),
                      shear=[float(s) for s in shear], interpolation=BILINEAR)
    return result[0].numpy()


def check_against_torchvision(images: np.ndarray, params: list[tuple]) -> None:
    angles, translations, scales, shears = (np.array(column, dtype=np.float64) for column in zip(*params))
    ours = augment.affine(images, angles, translations, scales, shears)
    expected = np.stack([torch_affine(image, *p) for image, p in zip(images, params)])
    assert ours.dtype == images.dtype and ours.shape == images.shape
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE[images.dtype.type])
    # Whatever backend warp_bilinear picked, the plain NumPy reference agrees with it too.
    matrices = augment.affine_matrices(angles, translations, scales, shears)
    np.testing.assert_allclose(augment.warp_bilinear_numpy(images, matrices), ours, rtol=0,
                               atol=TOLERANCE[images.dtype.type])


def random_images(count, height=32, width=32, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).random((count, height, width)).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES)
def test_affine_matches_torchvision(case, dtype):
    check_against_torchvision(random_images(2, dtype=dtype), [CASES[case]] * 2)


@pytest.mark.parametrize("height, width", [(28, 28), (32, 27), (5, 9)])
def test_affine_matches_torchvision_other_sizes(height, width):
    check_against_torchvision(random_images(3, height, width), list(CASES.values())[-3:])


def test_affine_batch_of_different_transforms_matches_torchvision():
    rng = np.random.default_rng(1)
    params = [(rng.uniform(-30, 30), tuple(rng.uniform(-4, 4, 2)), rng.uniform(0.8, 1.2),
               tuple(rng.uniform(-20, 20, 2))) for _ in range(16)]
    check_against_torchvision(random_images(16, dtype=np.float32), params)


def test_same_draws_as_random_affine_give_its_output():
    """transforms.v2.RandomAffine's own parameters, fed to ours, give the transform's output."""
    transform = v2.RandomAffine(12, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=10,
                                interpolation=BILINEAR, fill=None)
    images = random_images(8, dtype=np.float32)
    torch.manual_seed(0)
    for image in images:
        tensor = torch.from_numpy(image[np.newaxis].copy())
        params = transform.make_params([tensor])
        ours = augment.affine(image[np.newaxis], [params["angle"]], [params["translate"]],
                              [params["scale"]], [params["shear"]])
        np.testing.assert_allclose(ours[0], transform.transform(tensor, params)[0].numpy(),
                                   rtol=0, atol=TOLERANCE[np.float32])


# ---------------------------------------------------------------- hand-computed cases


def test_identity_returns_the_image():
    images = random_images(3)
    out = augment.affine(images, np.zeros(3), np.zeros((3, 2)), np.ones(3), np.zeros((3, 2)))
    np.testing.assert_array_equal(out, images)


def test_whole_pixel_shift_moves_pixels_and_fills_zeros():
    image = random_images(1, 6, 7)
    out = augment.affine(image, [0.0], [[2.0, -1.0]], [1.0], [[0.0, 0.0]])   # 2 right, 1 up
    expected = np.zeros_like(image)
    expected[0, :-1, 2:] = image[0, 1:, :-2]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_rotation_by_90_degrees_is_rot90():
    """F.affine turns clockwise (on screen, rows downwards): a quarter turn of a square image about
    its centre is np.rot90(k=-1), pixel for pixel."""
    image = random_images(1, 8, 8)
    out = augment.affine(image, [90.0], [[0.0, 0.0]], [1.0], [[0.0, 0.0]])
    np.testing.assert_allclose(out[0], np.rot90(image[0], k=-1), rtol=0, atol=1e-12)


def test_half_pixel_shift_averages_neighbours():
    image = random_images(1, 4, 5)
    out = augment.affine(image, [0.0], [[0.5, 0.0]], [1.0], [[0.0, 0.0]])
    expected = np.zeros_like(image[0])
    expected[:, 1:] = (image[0, :, 1:] + image[0, :, :-1]) / 2
    expected[:, 0] = image[0, :, 0] / 2          # the left neighbour is outside: zero
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-12)


def test_far_outside_is_zero():
    out = augment.affine(random_images(2), [0.0, 45.0], [[1e6, 0.0], [-40.0, 40.0]], [1.0, 1.0],
                         np.zeros((2, 2)))
    assert np.all(out == 0)


def test_channel_axis_is_kept():
    images = random_images(2)[:, np.newaxis]
    out = augment.affine(images, [5.0, -5.0], np.zeros((2, 2)), [1.0, 1.0], np.zeros((2, 2)))
    expected = augment.affine(images[:, 0], [5.0, -5.0], np.zeros((2, 2)), [1.0, 1.0], np.zeros((2, 2)))
    assert out.shape == images.shape
    np.testing.assert_array_equal(out[:, 0], expected)


# ---------------------------------------------------------------- random draws


def test_random_parameters_lie_in_their_ranges_and_follow_torchvision_rounding():
    ranges = AffineRanges(degrees=15, translate=0.1, scale=0.2, shear=12)
    draws = augment.random_affine_parameters(10_000, (40, 20), ranges, np.random.default_rng(0))
    assert np.all(np.abs(draws["angles"]) <= 15) and np.all(np.abs(draws["shears"][:, 0]) <= 12)
    assert np.all(draws["shears"][:, 1] == 0)
    assert np.all((0.8 <= draws["scales"]) & (draws["scales"] <= 1.2))
    tx, ty = draws["translations"].T
    assert np.all(tx == np.round(tx)) and np.all(ty == np.round(ty))
    # round(uniform(-2, 2)) for the width 20, round(uniform(-4, 4)) for the height 40: far enough
    # apart that swapping width and height changes the sets
    assert set(tx) == {-2, -1, 0, 1, 2} and set(ty) == {-4, -3, -2, -1, 0, 1, 2, 3, 4}
    # each range is covered, not just bounded (uniform: the mean is near the middle)
    assert abs(draws["angles"].mean()) < 0.5 and abs(draws["scales"].mean() - 1) < 0.01


def test_random_affine_is_affine_of_its_draws():
    ranges = AffineRanges(degrees=10, translate=0.1, scale=0.1, shear=10)
    images = random_images(5, dtype=np.float32)
    out = augment.random_affine(images, ranges, np.random.default_rng(3))
    draws = augment.random_affine_parameters(5, (32, 32), ranges, np.random.default_rng(3))
    np.testing.assert_array_equal(out, augment.affine(images, **draws))


def test_random_affine_without_a_generator_draws_from_a_fresh_one():
    """rng=None as numpylenet.data's random transforms: unseeded, so two calls differ."""
    ranges = AffineRanges(degrees=10, translate=0.1, scale=0.1, shear=10)
    images = random_images(5, dtype=np.float32)
    first, second = augment.random_affine(images, ranges), augment.random_affine(images, ranges)
    assert first.shape == images.shape and not np.array_equal(first, second)
    assert augment.random_affine_parameters(5, (32, 32), ranges)["angles"].shape == (5,)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs", [dict(degrees=-1), dict(translate=1.5), dict(scale=1.0),
                                    dict(scale=-0.1), dict(shear=90), dict(degrees=float("nan")),
                                    dict(degrees=float("inf"))])
def test_ranges_reject_bad_values(kwargs):
    with pytest.raises(ValueError):
        AffineRanges(**kwargs)


@pytest.mark.parametrize("which", ["angles", "translations", "scales", "shears"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_transform_parameters_are_refused(which, value):
    """Before either warp runs: they would fill the NaN coordinates differently."""
    parameters = dict(angles=np.zeros(2), translations=np.zeros((2, 2)), scales=np.ones(2),
                      shears=np.zeros((2, 2)))
    parameters[which][1] = value
    with pytest.raises(ValueError, match="finite|scales must be > 0"):
        augment.affine(random_images(2, dtype=np.float32), **parameters)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="angles"):
        augment.affine_matrices(np.zeros(2), np.zeros((3, 2)), np.ones(2), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="scales"):
        augment.affine_matrices(np.zeros(1), np.zeros((1, 2)), np.zeros(1), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="float32 or float64 images"):
        augment.warp_bilinear(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="one"):
        augment.warp_bilinear(np.zeros((2, 4, 4)), np.zeros((3, 2, 3)))


@pytest.mark.parametrize("dtype", [np.float16, np.longdouble, np.int32], ids=["f16", "longdouble", "int32"])
def test_warp_bilinear_refuses_other_dtypes_in_one_line(dtype):
    """float16 and long double reached the Numba kernel, which dumped a typing traceback."""
    with pytest.raises(ValueError, match="expected float32 or float64 images"):
        augment.warp_bilinear(np.zeros((1, 4, 4), dtype), np.eye(2, 3)[np.newaxis])


def test_warp_bilinear_reads_big_endian_images_and_an_empty_batch():
    """Big-endian floats (a file's byte order) warp as the native ones; an empty batch gives an
    empty batch on both paths (the NumPy one indexed image 0)."""
    images = random_images(2, 6, 5)
    matrices = augment.affine_matrices(np.array([10.0, -20.0]), np.array([[0.5, 0.0], [0.0, -1.0]]),
                                       np.array([1.1, 0.9]), np.zeros((2, 2)))
    np.testing.assert_array_equal(augment.warp_bilinear(images.astype(">f8"), matrices),
                                  augment.warp_bilinear(images, matrices))
    empty, no_matrices = np.zeros((0, 6, 5)), np.zeros((0, 2, 3))
    assert augment.warp_bilinear(empty, no_matrices).shape == (0, 6, 5)
    assert augment.warp_bilinear_numpy(empty, no_matrices).shape == (0, 6, 5)
