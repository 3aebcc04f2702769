"""MNIST-format data: the IDX reader, dataset search and splits, augmentation, batch order."""
from arraybn.data.augment import (AugmentConfig, Transforms, apply_transforms, augment_batch,
                                  crop_at, draw_transforms, random_affine, random_crop,
                                  random_crop_offsets, warp_affine)
from arraybn.data.batches import batch_indices, epoch_order, num_batches, step_rng
from arraybn.data.datasets import (CLASS_NAMES, DATASETS, DEBIAN_DIRS, ENV_VAR, FILES,
                                   DatasetNotFoundError, RawDataset, Split, candidate_dirs,
                                   dataset_fingerprint, find_dataset, load_dataset, normalise,
                                   pixel_stats, prepare_splits, sha256_file, split_indices)
from arraybn.data.idx import (IDXFormatError, parse_idx, read_idx, read_images, read_labels,
                              write_idx)

__all__ = ["AugmentConfig", "augment_batch", "random_affine", "random_crop", "warp_affine",
           "random_crop_offsets", "crop_at", "Transforms", "draw_transforms", "apply_transforms",
           "batch_indices",
           "epoch_order", "num_batches", "step_rng", "CLASS_NAMES", "DATASETS", "DEBIAN_DIRS",
           "ENV_VAR", "FILES", "DatasetNotFoundError", "RawDataset", "Split", "candidate_dirs",
           "dataset_fingerprint", "find_dataset", "load_dataset", "normalise", "pixel_stats",
           "prepare_splits", "sha256_file", "split_indices", "IDXFormatError", "parse_idx",
           "read_idx", "read_images", "read_labels", "write_idx"]
