r"""Losses: softmax cross-entropy (label smoothing, ignore_index), NLL and MSE, forward and
backward, with PyTorch's semantics (``torch.nn.functional.cross_entropy``, ``nll_loss``,
``mse_loss``).

Cross-entropy of logits x (N, C) and integer labels y (N,), label smoothing eps, for a row
with m = max_j x_j, s = sum_j e^{x_j - m}, t = sum_j (x_j - m), lse = m + log(s):

    loss_i = (1 - eps) * (log(s) - (x_{i,y_i} - m)) + eps / C * (C * log(s) - t)
           = -sum_j q_ij * log_softmax(x)_ij,     q = (1 - eps) * onehot(y) + eps / C
    dx_ij  = w_i * (e^{x_ij - lse_i} - q_ij)

Both terms of each line are >= 0, so logits of +-1e4 lose nothing to cancellation (t is summed
after subtracting m). w_i is the upstream gradient (dloss_i for reduction "none", the scalar
dloss for "sum", dloss / count for "mean"), count the number of rows whose label is not
ignore_index. A row labelled ignore_index has loss 0 and gradient 0 (its logits are not even
read, so NaN there does not spread; PyTorch's gradient would be NaN for such a row). "mean"
with every row ignored is 0/0 = NaN, as PyTorch's. NaN or +inf in a used row gives NaN; -inf
logits beside finite ones are fine (an -inf at the label gives loss inf, with eps > 0 any -inf
does, as PyTorch's).

NLL of values v (N, C) (``log_softmax`` output): loss_i = -v_{i,y_i}, dx_ij = -w_i [j = y_i].
MSE of x and t (any shape, n elements): loss = (x - t)^2, dx = 2 w (x - t) with w = dloss
(per element for "none"), / n for "mean".

Reductions are deterministic: per-row (or per-chunk) values, then a sum in a fixed order with
float64 accumulation (float32 for 16-bit inputs would be enough per row, not for 10^6 rows).

Labels: int32 or int64. A label outside [0, C) that is not ignore_index raises IndexError
before anything is written (PyTorch raises too). On the CPU backends the check is a pass over
the labels; on CUDA it is a small kernel whose result the host reads, which synchronizes the
stream: ``check_labels=False`` skips the check (no synchronization), and a bad row then gets a
NaN loss and a NaN gradient row, never an out-of-bounds read.

Saved values: ``cross_entropy_forward`` returns ``(loss, lse)``, lse (N,) float64 for every row
(ignored ones included). Passed to ``cross_entropy_backward(..., lse=lse)`` it spares the
backward the row max and sum: one pass that reads x and writes dx. lse is float64 because
e^{x - lse} with lse rounded to float32 would be off by |lse| * 2^-24 relative (6e-4 for
logits near 1e4); the kernels split it into two float32s hi + lo and compute
e^{(x - hi) - lo}, as accurate as the recomputed softmax.

Memory traffic (the fewest bytes, s = bytes per element, l per label):
    cross-entropy forward   read N*C*s + N*l, write N*s ("none") or s (+ 8N for lse)
    cross-entropy backward  read N*C*s + N*l (+ 8N lse, + N*s dloss for "none"), write N*C*s
    NLL forward             read N*s + N*l;  backward write N*C*s, read N*l
    MSE forward             read 2n*s, write n*s or s; backward read 2n*s (+ n*s), write n*s
CPU: each row is read in one pass for the max and one for the exp-sum (from cache). The
backward without lse writes e^{x - m} into dx and scales it in place. GPU: one block per row
(softmax.cu's launch shapes), rows up to 32768 held in registers: x read once.

Rough CPU figures (float32, this shared 2-core Xeon, noisy; gpunn bench losses): (4096, 1000)
cross-entropy forward 2.7 ms vs torch 4.3 ms, backward 2.6 ms (2.5 with lse) vs 4.3 ms for
torch's nll_loss_backward + _log_softmax_backward_data; on one thread each, 4.6 vs 6.9 ms and
4.9 (4.6) vs 7.7 ms. With label smoothing 0.1: 1.3x (forward) and 2.3x (backward) torch's.
MSE over 16M: forward 3.9x torch's (which materializes (x - t)^2), backward at the memory
limit, as torch's.

Modules, in reading order: reference (NumPy), cpu (Numba kernels), cuda (launchers of
kernels/losses.cu), api (checks, call path, public functions).
"""

from .api import (LABEL_DTYPES, REDUCTIONS, cross_entropy, cross_entropy_backward,
                  cross_entropy_forward, mse_loss, mse_loss_backward, nll_loss, nll_loss_backward)

__all__ = ["LABEL_DTYPES", "REDUCTIONS", "cross_entropy", "cross_entropy_backward",
           "cross_entropy_forward", "mse_loss", "mse_loss_backward", "nll_loss",
           "nll_loss_backward"]
