"""The optimizer algorithms, one module each: its formula, its options' checks and named
hyperparameters, its NumPy reference, its per-element update for the CPU walker, its
constructor options and functional step, described by one :class:`~gpunn.optim.hyper.Algorithm`.
Its CUDA update is its functor in kernels/optim.cu.

Adding an algorithm: a module here, its functor in kernels/optim.cu, and its line below; the
classes of gpunn.optim and gpunn.torch, the functional step and the kernel instantiations
follow from this registry.
"""

from ..walker import kernels
from .adagrad import ADAGRAD
from .adam import ADAM, ADAMW
from .lion import LION
from .rmsprop import RMSPROP
from .sgd import SGD

#: Every algorithm, by name, in the order of gpunn.optim's documentation.
ALGORITHMS = {a.name: a for a in (SGD, ADAGRAD, RMSPROP, ADAM, ADAMW, LION)}

#: kernels/optim.cu's instantiations: every dtype with every functor.
KERNELS = kernels(dict.fromkeys(a.functor for a in ALGORITHMS.values()))
