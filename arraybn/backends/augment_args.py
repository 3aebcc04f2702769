"""Argument checks of the backends' augmentation kernels (``numba_augment_kernels``,
``cupy_augment``): shapes and dtypes only, so that they read NumPy and CuPy arrays alike.

The kernels index without bounds checks, so a map array with fewer rows than images would read
past its end; these checks come first.
"""
FLOAT_DTYPES = ("float32", "float64")


def check_affine_crop_args(images, inverse, offset, shift, who):
    """Raise a clear error unless ``images`` is (N, C, H, W) float32/float64 and ``inverse``
    (N, 2, 2), ``offset`` (N, 2) and ``shift`` (N, 2) hold one map per image. ``who`` names the
    caller in the message."""
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{who}: images must be an array of shape (N, C, H, W), got "
                         f"{type(images).__name__} of shape {shape}; a batch of single-channel "
                         "images (N, H, W) becomes (N, 1, H, W) with images[:, None]")
    if images.dtype.name not in FLOAT_DTYPES:
        raise TypeError(f"{who}: images must be float32 or float64, got {images.dtype}; convert "
                        "them with images.astype(numpy.float32)")
    n = shape[0]
    for name, arr, wanted in (("inverse", inverse, (n, 2, 2)), ("offset", offset, (n, 2)),
                              ("shift", shift, (n, 2))):
        if tuple(getattr(arr, "shape", ())) != wanted:
            raise ValueError(f"{who}: {name} must have shape {wanted}, one map per image of the "
                             f"batch of {n}; got shape {getattr(arr, 'shape', None)}")
