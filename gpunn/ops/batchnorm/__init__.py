r"""Batch normalization, forward and backward, and batch normalization fused with ReLU.

x is seen as (A, C, B), C-contiguous: channels on axis 1 (NCHW: A = N, B = H*W*...) or, with
``channels_last=True``, on the last axis (NHWC: A = N*H*W*..., B = 1). Per channel c, over
its n = A*B values (a (N, C) input is the B = 1 case of either layout):

    training forward   mean_c = sum x / n,  var_c = sum (x - mean_c)^2 / n   (biased)
                       invstd_c = 1 / sqrt(var_c + eps)
                       y = (x - mean_c) * (w_c * invstd_c) + b_c
                       running_mean <- (1 - f) running_mean + f mean_c
                       running_var  <- (1 - f) running_var  + f var_c * n / (n - 1)  (unbiased)
                       with f = momentum, or 1 / num_batches_tracked when momentum is None
                       (cumulative average, as torch.nn.BatchNorm: the caller passes the number
                       of batches seen, this one included)
    eval forward       the same y with mean = running_mean, invstd = 1/sqrt(running_var + eps)
    backward           xhat = (x - mean) * invstd,  g = dy  (BN+ReLU: g = dy where y > 0, else 0)
                       dbias_c = sum g,  dweight_c = sum g * xhat
                       training: dx = w invstd (g - dbias_c / n - xhat dweight_c / n)
                       eval:     dx = w invstd g    (the statistics are constants)

affine=False is weight = bias = None (w = 1, b = 0); track_running_stats=False is
running_mean = running_var = None, which uses the batch statistics in eval mode too (as
torch.nn.BatchNorm does). The forward returns (y, mean, invstd), torch's saved statistics,
never a copy of x; in eval mode they are the running statistics the output used.

The fused BN+ReLU computes y = max(z, 0) with z the batch-norm output (NaN stays NaN). Its
backward RECOMPUTES z from x, mean, invstd, weight and bias (it needs x anyway) instead of
reading a saved y: no extra array is stored or read. The mask is "z > 0" with z computed by the
same arithmetic as the forward of the same backend, and on the GPU z rounded to the storage type
first, so the mask is exactly torch's ``y > 0`` on the stored output (also for float16 values
that round to 0).

Statistics are accurate for data with a large mean (mean 1e4, spread 1 in float32), and with
outliers: the values are never summed raw. Short blocks get their own (mean, M2), and blocks
are combined with Chan's update of (count, mean, M2): on the GPU and in the CPU rows reduction
a block's mean and centered sum of squares take two passes over it (registers, or cache); the
CPU columns reduction sums each block once, shifted by the running mean of the rows before it
(see cpu_stats.stats_cols for why that cannot cancel badly). Running sums are float64 on the
CPU, float32 (float64 for float64 data) on the GPU. No float atomics anywhere: results are the
same run to run. (y and dx use the saved mean, rounded to the compute dtype like torch's: with
a mean of 1e4 in float32 that rounding, up to 5e-4, shows as an absolute error of up to
5e-4 * invstd * |w| in y, below the 1e-3 spacing of the float32 inputs themselves there; mean,
invstd and the running statistics stay at float32 accuracy.)

Memory traffic (what the kernels move; bench/ counts the same): training forward reads x twice
(statistics, then normalize) and writes y: 3 arrays. Eval forward reads x once and writes y: 2.
Training backward reads dy and x twice (the two sums, then dx) and writes dx: 5 arrays; the
single-pass minimum (dy, x, dx) would need the whole batch held on chip. Per-channel partials
and coefficients are O(C * splits), negligible.

Decomposition (CPU and GPU alike): the per-channel reduction is split into many pieces, each
writing partial statistics, which a second, deterministic pass merges per channel; so a
handful of channels still keeps every core busy, and 4096 channels do not overload anything.
Two shapes of the reduction:
  rows     B large (NCHW with a spatial extent): piece = (channel, slice of its A*B values),
           walked along contiguous rows of B.
  columns  B small (channels-last, (N, C), NCHW with tiny spatial): x as (A, K = C*B), piece =
           (slice of the A rows, tile of columns), vectorized across columns; the merge folds
           the B columns of a channel too.
The rows shape is used from B >= CPU_ROWS_MIN (64) on the CPU and B >= GPU_ROWS_MIN (32) on
the GPU. The elementwise passes (normalize, dx) walk rows of B for B > 1 and blocks of whole
channels-last rows for B = 1. One channel is one long row (A, C, B) = (1, 1, n).

Layouts: ``channels_last`` says where the channels are in the array as given (C-contiguous);
it is the same flag for the forward and the backward, and y, dx come back in that layout. A
torch tensor in the channels_last memory format but NCHW shape is not C-contiguous and is
copied first; pass ``x.permute(0, 2, 3, 1)`` (a contiguous view) with channels_last=True to
use it in place.

Dtypes: float32/float64 on the CPU backends, float16/bfloat16/float32/float64 on CUDA (float32
statistics and math for the 16-bit types). weight, bias and the running statistics share one
dtype: x's, or float32 when x is 16-bit (torch's mixed precision). mean and invstd are float32
for 16-bit x, else x's dtype. dweight and dbias come back even when weight is None (they are the
gradients of an implicit weight of ones and bias of zeros), in the dtype of weight (x's when
weight is None).

Errors are raised before anything is written (running statistics included): x with fewer than
2 dimensions, per-channel arrays of the wrong shape (ValueError; torch raises RuntimeError) or
dtype (TypeError), only one of running_mean and running_var, in training a non-contiguous or
read-only running statistic or one sharing memory with another argument, out partly
overlapping an input (out=x is fine), training with one value per channel (ValueError with
torch's message), momentum=None without num_batches_tracked. NaN in x makes its channel's
statistics, running statistics and outputs NaN, as in torch; in BN+ReLU's backward a NaN z
passes dy, as torch's threshold_backward does. An empty batch in training gives NaN
mean/invstd and leaves the running statistics untouched (torch leaves them too).

The modules, in reading order: ``reference`` (the NumPy reference), ``cpu_stats`` (the Numba
reductions and their finalize), ``cpu`` (the Numba elementwise passes and drivers), ``cuda``
(the launcher of ``kernels/batchnorm.cu`` and the constants it shares with it), ``api`` (the
argument checks, the call path and the public functions below).
"""

from .api import (batch_norm, batch_norm_backward, batch_norm_forward, batch_norm_relu,
                  batch_norm_relu_backward, batch_norm_relu_forward)

__all__ = ["batch_norm", "batch_norm_backward", "batch_norm_forward", "batch_norm_relu",
           "batch_norm_relu_backward", "batch_norm_relu_forward"]
