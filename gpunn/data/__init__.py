"""Datasets (scikit-learn's digits, MNIST-style IDX files, .npz) and mini-batching."""

from .datasets import (Dataset, load, load_digits, load_idx, load_npz, read_idx,
                       stratified_split)
from .loader import DataLoader, batches, order

__all__ = ["Dataset", "DataLoader", "batches", "load", "load_digits", "load_idx", "load_npz",
           "order", "read_idx", "stratified_split"]
