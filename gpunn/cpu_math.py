r"""Scalar math for Numba CPU kernels that LLVM can vectorize, in float32 and float64.

Call these from Numba-compiled code only, on float32 or float64 scalars::

    @njit(parallel=True, cache=True)
    def sigmoid_kernel(x, y):
        for i in prange(x.size):
            y[i] = cpu_math.sigmoid(x[i])

As the body of a ``prange`` such a loop may come out slower than as a plain ``range`` loop in a
function of its own: there LLVM broadcast every constant again in each iteration (gelu: 79
instead of 43 instructions per 8 elements). gpunn/ops/activations.py runs the plain loop over
chunks from a parallel driver.

Why: the llvmlite wheels on PyPI ship no SVML, so ``math.exp`` on float32 is a scalar libm call
per element, and a loop using it runs several times slower than memory allows. The float32
versions here are straight-line float32 arithmetic (selects instead of branches, no libm calls,
no float64 constants), so such a loop vectorizes. The float64 versions call ``math`` (libm).

Each public name is a pure-Python stub with a Numba ``overload`` per dtype. The overloads are
compiled with ``error_model="numpy"`` (no zero-division check on ``/``, which would stop the
vectorizer in a plain ``range`` loop) and LLVM inlines them into the caller, whose
``cache=True`` keeps working; a caller's ``fastmath=True`` does not reach them, so inf and NaN
handling holds there too.

Math of the float32 path
    exp(x)        x clamped to [-104, 89] (beyond: 0 / inf), n = rint(x/ln2),
                  r = x - n*ln2 in [-ln2/2, ln2/2] with ln2 split in two (Cody-Waite;
                  x - n*LN2_HI is exact), e^r = 1 + r + r^2*P(r), P of degree 4, and
                  e^x = e^r * 2^h * 2^(n-h), h = floor(n/2): two factors built from exponent
                  bits, each a normal float, so e^x overflows to inf and underflows gradually
                  (one rounding) down to 0.
    expm1(x)      x clamped to [-80, 89], the same reduction, q = r + r^2*P(r) = e^r - 1, and
                  e^x - 1 = 2*(h*q + (h - 1/2)), h = 2^(n-1) from exponent bits: one rounding
                  with FMA, exact for n = 0 (|x| < ln2/2, where r = x); x itself below 2^-100.
    sigmoid(x)    e = e^-|x| (as exp, the 2^n factor as below), (1 or e)/(1 + e) for x >= 0 or
                  x < 0 (no overflow, and relative accuracy in the left tail down to the
                  subnormals).
    tanh(x)       x*P(x^2)/Q(x^2), P and Q of degree 4, for x clamped to [-9, 9] (tanh(9)
                  rounds to 1 in float32). One division and no exp: 3x cheaper than
                  (1 - e^-2|x|)/(1 + e^-2|x|) with a series near 0, at 3.3e-7 instead of 1.7e-7.
    normal_cdf(x) Phi(-a) = e^(-a^2/2) * G(a), a = min(|x|, 14.4) (Phi(-14.4) is 0 in float32),
                  G(a) = erfc(a/sqrt(2)) e^(a^2/2)/2 = P(a)/Q(a), P and Q of degree 4 and 5;
                  Phi(x) = Phi(-a) for x < 0, 1 - Phi(-a) for x >= 0. One division and one exp,
                  the rational and the exp's polynomial independent of each other.
    normal_pdf(x) phi(x) = e^(-a^2/2)/sqrt(2*pi).
    In both, r = -a^2/2 - n*ln2 comes from one fma, fma(-a/2, a, -n*LN2_HI), in which the
    product is exact (and n*LN2_HI is exact), then r - n*LN2_LO. Rounding a^2 first would cost
    5e-6 relative error in the far tails (a^2/2 ~ 100 times 2^-24).
    Where the result may underflow (sigmoid, normal_cdf, normal_pdf: e^v with v <= 0), e^r's
    coefficients are scaled by 2^-64 and the product by 2^(n+64) comes last: one factor built
    from exponent bits, a normal float for n in [-150, 0], and one rounding into the subnormals.

P for exp is a near-minimax fit of the relative error of e^r - 1 on [-ln2/2, ln2/2]: Lawson's
iteratively reweighted least squares on 20000 Chebyshev nodes in float64 against mpmath,
coefficients then rounded to float32. The rational P/Q for tanh is fitted the same way on [0, 9],
linearized as x*P - tanh(x)*Q with Q(0) = 1 and reweighted by the previous Q (Loeb's method).
P/Q for G is the minimax fit of its relative error on [0, 14.4] (3300 points, mpmath
reference), Loeb's linearization solved as a linear program at each step; then Q is rounded to
float32, P refitted to the rounded Q (a linear minimax problem) and rounded.
The fits alone are good to 1.3e-8, 2.1e-8 and 3.9e-8, so float32 rounding sets the accuracy.
Polynomials are evaluated by Horner with fused multiply-adds where the CPU has them.

Max relative error of the float32 path against float64 references, measured exhaustively over
every float32 with 2^-20 <= |x| <= 128 (tests/test_cpu_math.py checks the whole range), with FMA
(without, as with NUMBA_CPU_NAME=generic): exp 7.6e-8 (9.9e-8), expm1 1.2e-7 (1.2e-7),
sigmoid 1.8e-7 (1.9e-7), tanh 3.3e-7 (3.7e-7), normal_cdf 4.4e-7 (4.7e-7), normal_pdf 1.7e-7
(1.9e-7). Results that are subnormal in float32 are within half a subnormal ulp.
exp(+-inf) = inf, 0; expm1(-inf) = -1; sigmoid(+-inf) = 1, 0; tanh(+-inf) = +-1;
normal_cdf(+-inf) = 1, 0; NaN gives NaN.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["exp", "expm1", "sigmoid", "tanh", "normal_cdf", "normal_pdf"]

_f = np.float32
_NEG_HALF, _HALF, _ONE, _TWO = _f(-0.5), _f(0.5), _f(1.0), _f(2.0)

# exp: clamp range, 1/ln2, ln2 = LN2_HI + LN2_LO with LN2_HI = 355/512 (n*LN2_HI is exact)
_EXP_MIN, _EXP_MAX = _f(-104.0), _f(89.0)
_LOG2E = _f(1.4426950408889634)
_ROUND = _f(1.5 * 2**23)  # v + _ROUND rounds v to an integer, kept in the low mantissa bits
_NEG_LN2_HI, _NEG_LN2_LO = _f(-0.693359375), _f(2.1219444005469057e-4)
# e^r - 1 = r + r^2*P(r) on |r| <= ln2/2 (fit error 1.3e-8 relative to e^r - 1, 5e-9 to e^r),
# and E = (1, 1, *P): e^r = sum E[k] r^k
_EXP_P = tuple(map(_f, (0.4999999701976776, 0.1666654348373413, 0.04166720062494278,
                        0.00836651399731636, 0.0013882522471249104)))
_EXP_E = (_ONE, _ONE) + _EXP_P
# tanh(x) = x*P(x^2)/Q(x^2) on |x| <= 9, +-1 beyond (fit error 2.1e-8)
_TANH_MAX = _f(9.0)
_TANH_P = tuple(map(_f, (1.0, 0.13381028175354004, 0.0034955914597958326, 2.0609133571269922e-05,
                         1.3354725325598338e-08)))
_TANH_Q = tuple(map(_f, (1.0, 0.4671434462070465, 0.02587699517607689, 0.00032856399775482714,
                         7.776585562169203e-07)))
# Gaussian tails: |x| clamped to 14.4 (phi and Phi are 0 in float32 beyond)
_GAUSS_MAX = _f(14.4)
_INV_SQRT_2PI = _f(1.0 / math.sqrt(2.0 * math.pi))
# Phi(-a) = e^(-a^2/2) * G(a), G(a) = erfc(a/sqrt(2)) e^(a^2/2) / 2 = P(a)/Q(a) on [0, 14.4]
_GAUSS_P = tuple(map(_f, (0.5, 0.4399964511394501, 0.1845221370458603, 0.04107411950826645,
                          0.004183710087090731)))
_GAUSS_Q = tuple(map(_f, (1.0, 1.6778780221939087, 1.2077914476394653, 0.4728735387325287,
                          0.10296358913183212, 0.010486895218491554)))
# results that may underflow: a value v*2^-SHIFT is computed as (v*2^-SHIFT) * 2^(n+SHIFT), so
# that 2^(n+SHIFT) is a normal float for n in [-150, 0] and the last product rounds once
_SHIFT = 64
_EXP_E_SHIFTED = tuple(_f(c * 2.0**-_SHIFT) for c in _EXP_E)
_NEG_HALF_LOG2E = _f(-0.5 / math.log(2.0))
# expm1: x clamped to [-80, 89]; below _EXPM1_TINY, expm1(x) = x
_EXPM1_MIN = _f(-80.0)
_EXPM1_TINY = _f(2.0**-100)

_INV_SQRT2_64 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI_64 = 1.0 / math.sqrt(2.0 * math.pi)


def _call(builder, name, *args):
    """Call the LLVM intrinsic `name` on float32 args."""
    fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * len(args))
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), list(args))


@intrinsic
def _fma(typingctx, a, b, c):
    """a*b + c rounded once, for float32 (a libm call on a CPU without FMA instructions)."""
    if not a == b == c == types.float32:
        return None
    return a(a, b, c), lambda context, builder, sig, args: _call(builder, "llvm.fma.f32", *args)


@intrinsic
def _horner(typingctx, x, coefs):
    """c[0] + x*(c[1] + x*(c[2] + ...)) for a float32 x and a tuple c of float32 constants."""
    if x != types.float32 or not (isinstance(coefs, types.UniTuple) and coefs.dtype == x):
        return None

    def codegen(context, builder, sig, args):
        acc = builder.extract_value(args[1], coefs.count - 1)
        for k in range(coefs.count - 2, -1, -1):
            # llvm.fmuladd: fused where the CPU has FMA, a multiply and an add elsewhere
            c = builder.extract_value(args[1], k)
            acc = _call(builder, "llvm.fmuladd.f32", acc, args[0], c)
        return acc

    return x(x, coefs), codegen


@intrinsic
def _ldexp(typingctx, p, t):
    """p * 2**n for float32 p and t = _ROUND + n, n an integer in [-252, 254] (NaN t: any factor).

    n is read from the low mantissa bits of t (no float-to-int conversion, so NaN is harmless) and
    2**n is applied as two factors 2**h * 2**(n - h), h = n >> 1, each a normal float built from
    its exponent bits: the result overflows to inf and underflows gradually, with one rounding.
    """
    if p != types.float32 or t != types.float32:
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        n = builder.sub(builder.bitcast(args[1], i32), ir.Constant(i32, int(_ROUND.view(np.int32))))
        h = builder.ashr(n, ir.Constant(i32, 1))
        y = args[0]
        for e in (h, builder.sub(n, h)):
            bits = builder.shl(builder.add(e, ir.Constant(i32, 127)), ir.Constant(i32, 23))
            y = builder.fmul(y, builder.bitcast(bits, ir.FloatType()))
        return y

    return p(p, t), codegen


@intrinsic
def _pow2(typingctx, t, shift):
    """2**(n + shift) for float32 t = _ROUND + n and an integer constant shift, where
    n + shift is in [-126, 127]: a normal float built from exponent bits (NaN t: any float).

    The bits of t are those of _ROUND plus n, and the bits of _ROUND shifted left by 23 are 0,
    so bits(t) << 23 is n << 23.
    """
    if t != types.float32 or not isinstance(shift, types.IntegerLiteral):
        return None
    bias = (127 + shift.literal_value) << 23

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.bitcast(args[0], i32), ir.Constant(i32, 23))
        return builder.bitcast(builder.add(bits, ir.Constant(i32, bias)), ir.FloatType())

    return t(t, shift), codegen


@njit(inline="always")
def _exp_f32_reduce(x):
    """(t, r) for float32 x: t = _ROUND + n, n = rint(x/ln2), r = x - n*ln2."""
    t = _horner(x, (_ROUND, _LOG2E))
    n = t - _ROUND
    return t, _horner(n, (_horner(n, (x, _NEG_LN2_HI)), _NEG_LN2_LO))


def _exp_f32(x):
    x = _EXP_MIN if x < _EXP_MIN else x  # NaN stays NaN
    x = _EXP_MAX if x > _EXP_MAX else x
    t, r = _exp_f32_reduce(x)
    return _ldexp(_horner(r, _EXP_E), t)


def _expm1_f32(x):
    v = _EXPM1_MIN if x < _EXPM1_MIN else x  # NaN stays NaN
    v = _EXP_MAX if v > _EXP_MAX else v
    t, r = _exp_f32_reduce(v)
    q = _horner(r, (r, r * _horner(r, _EXP_P)))  # e^r - 1
    h = _pow2(t, -1)
    y = _horner(q, (h - _HALF, h)) * _TWO  # 2^n (1 + q) - 1, rounded once (with FMA)
    return x if abs(x) < _EXPM1_TINY else y  # h*q would be subnormal


def _sigmoid_f32(x):
    v = -abs(x)
    v = _EXP_MIN if v < _EXP_MIN else v  # NaN stays NaN
    t, r = _exp_f32_reduce(v)
    e = _horner(r, _EXP_E_SHIFTED) * _pow2(t, _SHIFT)  # e^-|x|
    return (_ONE if x >= 0 else e) / (_ONE + e)


def _tanh_f32(x):
    x = _TANH_MAX if x > _TANH_MAX else x  # NaN stays NaN
    x = -_TANH_MAX if x < -_TANH_MAX else x
    s = x * x
    return x * _horner(s, _TANH_P) / _horner(s, _TANH_Q)


@njit(inline="always")
def _gauss_f32(x):
    """(a, p, s): a = min(|x|, 14.4) and e^(-a^2/2) = p*s, p = e^r * 2^-SHIFT, s = 2^(n + SHIFT).

    r = -a^2/2 - n*ln2 comes from one fma: a*(-a/2) is exact in it, and n*LN2_HI is exact.
    """
    a = abs(x)
    a = _GAUSS_MAX if a > _GAUSS_MAX else a  # NaN stays NaN
    t = _horner(a * a, (_ROUND, _NEG_HALF_LOG2E))
    n = t - _ROUND
    r = _horner(n, (_fma(a * _NEG_HALF, a, n * _NEG_LN2_HI), _NEG_LN2_LO))
    return a, _horner(r, _EXP_E_SHIFTED), _pow2(t, _SHIFT)


def _normal_cdf_f32(x):
    a, p, s = _gauss_f32(x)
    half_erfc = p * (_horner(a, _GAUSS_P) / _horner(a, _GAUSS_Q)) * s  # Phi(-|x|)
    return half_erfc if x < 0 else _ONE - half_erfc


def _normal_pdf_f32(x):
    a, p, s = _gauss_f32(x)
    return p * _INV_SQRT_2PI * s


def _sigmoid_f64(x):
    e = math.exp(-abs(x))
    s = 1.0 / (1.0 + e)
    return s if x >= 0.0 else e * s


def _normal_cdf_f64(x):
    return 0.5 * math.erfc(-x * _INV_SQRT2_64)


def _normal_pdf_f64(x):
    return math.exp(-0.5 * x * x) * _INV_SQRT_2PI_64


def _overload(f32, f64):
    """Make the decorated stub a Numba function: f32 for float32 arguments, f64 for float64."""

    def decorate(stub):
        @overload(stub, jit_options={"error_model": "numpy"})
        def _impl(x):
            if x == types.float32:
                return f32
            if x == types.float64:
                return f64
            return None

        return stub

    return decorate


def _stub(name):
    raise TypeError(f"gpunn.cpu_math.{name} is only callable from Numba-compiled code")


@_overload(_exp_f32, lambda x: math.exp(x))
def exp(x):
    """e**x."""
    _stub("exp")


@_overload(_expm1_f32, lambda x: math.expm1(x))
def expm1(x):
    """e**x - 1, accurate for small |x|."""
    _stub("expm1")


@_overload(_sigmoid_f32, _sigmoid_f64)
def sigmoid(x):
    """1 / (1 + e**-x), without overflow: 0 at -inf, 1 at inf."""
    _stub("sigmoid")


@_overload(_tanh_f32, lambda x: math.tanh(x))
def tanh(x):
    """tanh(x), accurate for small |x|."""
    _stub("tanh")


@_overload(_normal_cdf_f32, _normal_cdf_f64)
def normal_cdf(x):
    """Phi(x) = erfc(-x/sqrt(2))/2, the standard normal CDF, accurate in the left tail."""
    _stub("normal_cdf")


@_overload(_normal_pdf_f32, _normal_pdf_f64)
def normal_pdf(x):
    """phi(x) = exp(-x^2/2)/sqrt(2*pi), the standard normal density."""
    _stub("normal_pdf")
