"""Seeded random augmentation in NumPy: affine maps (rotation, shear, zoom, shift) and random
crops.

Each image gets one affine map drawn at random; the batch is warped in one vectorised pass with
bilinear sampling. Pixels that map outside the source image take ``fill`` (the normalised
background value). Then, with ``crop`` > 0, each image is padded by ``crop`` pixels of ``fill``
(zero padding of the raw image) and a random window of the original size is cut out: the
content moves by a whole number of pixels in [-crop, crop] along each axis, as in the random
cropping of the second seed text and He et al. 2016 (pad 4 on CIFAR's 32x32). For 28x28 images
we suggest ``crop=2``: pad 4 on 32 pixels is 1/8 of the width (3.5 pixels of 28), and
Fashion-MNIST's objects fill the frame more closely than CIFAR's, so 2 keeps them inside.

The NumPy functions here are the reference. The trainer draws a batch's transforms
(``draw_transforms``) and applies them with ``apply_transforms``, which on a backend with an
augmentation kernel (``Backend.augment_ops``: numba, cupy) warps and crops in one pass on that
backend, giving the reference's values bit for bit; the draws are the same on every backend.
"""
from dataclasses import asdict, dataclass

import numpy as np

from arraybn.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transform: each parameter is drawn uniformly from +-range.

    rotation: degrees; shear: shear factor (x shifted by shear * y); zoom: relative scale
    change (0.1 -> scale in [0.9, 1.1]); shift: fraction of the image height/width;
    crop: random-crop padding in whole pixels (0: off), applied after the affine map.
    """
    rotation: float = 10.0
    shear: float = 0.1
    zoom: float = 0.1
    shift: float = 0.1
    crop: int = 0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not value >= 0:
                raise ConfigError(f"augmentation range {name} must be >= 0, got {value}")
        if int(self.crop) != self.crop:
            raise ConfigError(f"augmentation crop is a padding in whole pixels, got {self.crop}")
        if self.zoom >= 1:
            raise ConfigError(f"augmentation zoom must be < 1 (scale 1 +- zoom), got {self.zoom}")


def random_affine(n, height, width, rng, config=AugmentConfig()):
    """Inverse maps for ``n`` random transforms: ``(A, t)`` of shapes (n, 2, 2) and (n, 2).

    A source point is ``A @ (p - centre) + centre + t`` for the output point ``p = (row, col)``.
    """
    angle = np.deg2rad(rng.uniform(-config.rotation, config.rotation, n))
    shear = rng.uniform(-config.shear, config.shear, n)
    scale = 1.0 + rng.uniform(-config.zoom, config.zoom, (n, 2))
    shift = rng.uniform(-config.shift, config.shift, (n, 2)) * np.array([height, width])
    cos, sin = np.cos(angle), np.sin(angle)
    rotate = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shear_m = np.zeros((n, 2, 2))
    shear_m[:, 0, 0] = shear_m[:, 1, 1] = 1.0
    shear_m[:, 1, 0] = shear                       # col += shear * row
    forward = rotate @ shear_m * scale[:, :, None]  # row i of the map scaled by scale[i]
    inverse = np.linalg.inv(forward)
    offset = -np.einsum("nij,nj->ni", inverse, shift)
    return inverse, offset


def warp_affine(images, inverse, offset, fill=0.0):
    """Bilinearly resample ``images`` (N, C, H, W) through per-image inverse maps.

    ``inverse`` (N, 2, 2) and ``offset`` (N, 2) come from ``random_affine``. Returns an array of
    the input's shape and dtype.
    """
    n, channels, height, width = images.shape
    centre = np.array([(height - 1) / 2.0, (width - 1) / 2.0])
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    grid = np.stack([rows.ravel(), cols.ravel()], 0) - centre[:, None]          # (2, HW)
    # element-wise, not ``inverse @ grid``: BLAS may fuse the products into an FMA depending on
    # the CPU, and the backends' kernels repeat exactly these roundings (see augment_ops)
    src = (inverse[:, :, 0, None] * grid[0] + inverse[:, :, 1, None] * grid[1]
           + (centre + offset)[:, :, None])                                   # (N, 2, HW)
    top_left = np.floor(src)
    frac = (src - top_left).astype(images.dtype)
    r0, c0 = top_left[:, 0].astype(np.int64), top_left[:, 1].astype(np.int64)
    flat = images.reshape(n, channels, height * width)
    out = np.zeros((n, channels, height * width), dtype=images.dtype)
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        r, c = r0 + dr, c0 + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        index = np.where(inside, r * width + c, 0)
        values = np.take_along_axis(flat, index[:, None, :], axis=2)
        values = np.where(inside[:, None, :], values, images.dtype.type(fill))
        weight = (frac[:, 0] if dr else 1 - frac[:, 0]) * (frac[:, 1] if dc else 1 - frac[:, 1])
        out += weight[:, None, :] * values
    return out.reshape(images.shape)


def random_crop_offsets(n, pad, rng):
    """(n, 2) window corners (row, column), each uniform in [0, 2 pad]."""
    return rng.integers(0, 2 * int(pad) + 1, size=(n, 2))


def random_crop(images, pad, rng, fill=0.0):
    """Pad ``images`` (N, C, H, W) by ``pad`` pixels of ``fill``, cut a random H x W window from
    each (one offset per image, uniform in [0, 2 pad] per axis); returns (crops, offsets (N, 2)).

    Crop n shows the image shifted by ``pad - offsets[n]`` pixels (rows, columns).
    """
    offsets = random_crop_offsets(images.shape[0], pad, rng)
    return crop_at(images, offsets, pad, fill), offsets


def crop_at(images, offsets, pad, fill=0.0):
    """The H x W windows at ``offsets`` (N, 2) of ``images`` padded by ``pad`` pixels of fill."""
    n, channels, height, width = images.shape
    pad = int(pad)
    padded = np.full((n, channels, height + 2 * pad, width + 2 * pad), fill, dtype=images.dtype)
    padded[:, :, pad:pad + height, pad:pad + width] = images
    rows = offsets[:, 0, None] + np.arange(height)                 # (N, H)
    cols = offsets[:, 1, None] + np.arange(width)                  # (N, W)
    return padded[np.arange(n)[:, None, None, None], np.arange(channels)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]


@dataclass(frozen=True)
class Transforms:
    """One batch's random transforms: the affine maps ``inverse`` (N, 2, 2) and ``offset``
    (N, 2) of ``random_affine``, and, with a crop, the window ``corners`` (N, 2) of
    ``random_crop_offsets`` over a padding of ``pad`` pixels (``corners`` None: no crop)."""
    inverse: np.ndarray
    offset: np.ndarray
    corners: np.ndarray = None
    pad: int = 0

    def __getitem__(self, rows):
        """The transforms of the images ``rows`` (a slice or index array)."""
        corners = None if self.corners is None else self.corners[rows]
        return Transforms(self.inverse[rows], self.offset[rows], corners, self.pad)

    def window_shifts(self):
        """(N, 2) int64: crop pixel (i, j) is warped pixel (i, j) + shift (fill outside the
        frame): ``corners - pad``, zeros without a crop."""
        if self.corners is None:
            return np.zeros((len(self.inverse), 2), dtype=np.int64)
        return self.corners.astype(np.int64) - self.pad


def draw_transforms(n, height, width, rng, config=AugmentConfig()):
    """``n`` random transforms for images of ``height`` x ``width``: the affine maps, then (when
    ``config.crop`` > 0) the crop windows, drawn from ``rng`` in that order."""
    inverse, offset = random_affine(n, height, width, rng, config)
    corners = random_crop_offsets(n, config.crop, rng) if config.crop else None
    return Transforms(inverse, offset, corners, int(config.crop))


def apply_transforms(images, transforms, fill=0.0, backend=None):
    """``images`` (N, C, H, W) float32/float64 warped and cropped by ``transforms`` (one per
    image); an array of the input's shape and dtype.

    With a ``backend`` whose ``augment_ops()`` has a kernel (numba, cupy), the kernel does both
    in one pass on the backend's device and gives the same values as the NumPy reference
    (``warp_affine``, then ``crop_at``), which runs otherwise.
    """
    n = _checked_shape(images)[0]
    if len(transforms.inverse) != n:
        raise ValueError(f"{len(transforms.inverse)} transforms for a batch of {n} images; "
                         "draw one per image")
    kernels = None if backend is None else backend.augment_ops()
    if kernels is not None:
        return kernels.affine_crop(backend.xp.asarray(images), transforms.inverse,
                                   transforms.offset, transforms.window_shifts(), fill)
    out = warp_affine(images, transforms.inverse, transforms.offset, fill)
    if transforms.corners is None:
        return out
    return crop_at(out, transforms.corners, transforms.pad, fill)


def _checked_shape(images):
    """The shape of ``images``, once it is a float32/float64 (N, C, H, W) batch."""
    shape = getattr(images, "shape", ())
    if len(shape) != 4:
        raise ValueError(f"augmentation needs images of shape (N, C, H, W), got shape {shape}; "
                         "single-channel images (N, H, W) become (N, 1, H, W) with images[:, None]")
    if images.dtype not in (np.float32, np.float64):
        raise TypeError(f"augmentation needs float32 or float64 images, got {images.dtype}; "
                        "convert them with images.astype(numpy.float32)")
    return shape


def augment_batch(images, rng, config=AugmentConfig(), fill=0.0, backend=None):
    """A randomly transformed copy of ``images`` (N, C, H, W), one transform per image: the
    affine map, then (when ``config.crop`` > 0) the random crop; on ``backend``'s kernel where
    it has one (see ``apply_transforms``)."""
    n, _, height, width = _checked_shape(images)
    return apply_transforms(images, draw_transforms(n, height, width, rng, config), fill, backend)
