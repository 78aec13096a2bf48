"""What ``gpunn train`` can set: :class:`TrainConfig` and :class:`AugmentConfig`.

Kept apart from :mod:`gpunn.train` so that importing it loads neither NumPy nor Numba: the
command line builds its parser (and every ``--help``) from these defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class AugmentConfig:
    """The random affine warp applied to every training batch (see :func:`gpunn.ops.augment`):
    rotation in +-degrees, shift in +-translate of the image, zoom in [1-scale, 1+scale],
    area-preserving stretch exp(+-stretch), shear in +-shear degrees, horizontal flips."""

    degrees: float = 10.0
    translate: float = 0.1
    scale: float = 0.1
    stretch: float = 0.1
    shear: float = 5.0
    flip_p: float = 0.0

    def kwargs(self) -> dict:
        return dict(degrees=self.degrees, translate=(self.translate, self.translate),
                    scale=(1.0 - self.scale, 1.0 + self.scale), stretch=self.stretch,
                    shear=self.shear, flip_p=self.flip_p)


@dataclass
class TrainConfig:
    """Everything ``gpunn train`` can set, with its defaults (the digits MLP)."""

    data: str | None = None            # None/"digits", an .npz, or an MNIST IDX folder/prefix
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2         # AdamW's decoupled decay
    width: int = 256                   # hidden units per layer
    depth: int = 2                     # hidden layers (Linear-BatchNorm-ReLU-Dropout each)
    dropout: float = 0.2
    warmup_epochs: float = 1.0         # linear warm-up before the cosine decay
    label_smoothing: float = 0.1
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    seed: int = 0
    ensemble: int = 1
    test_fraction: float = 0.25        # stratified hold-out when the data has no test split
    split_seed: int = 0                # the hold-out's draw (fixed: seeds change the model only)
    device: str | None = None          # cpu | numpy | cuda; None: the best available

    def __post_init__(self):
        for name, low in (("epochs", 1), ("batch_size", 1), ("width", 1), ("depth", 0),
                          ("ensemble", 1), ("seed", 0), ("split_seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "weight_decay", "warmup_epochs", "label_smoothing"):
            if not (isinstance(getattr(self, name), (int, float))
                    and math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got "
                                 f"{getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.device is not None:
            from .nn.module import array_module_of

            array_module_of(self.device)  # a clear error for an unknown or missing device

    def resolved_device(self) -> str:
        return self.device or best_device()

    def to_dict(self) -> dict:
        return asdict(self)


def best_device() -> str:
    """cuda where CuPy sees a GPU, else the Numba kernels, else the NumPy reference."""
    from . import backend

    available = backend.available()
    return "cuda" if "cuda" in available else "cpu" if "cpu" in available else "numpy"
