"""Explicit vector code for the Numba CPU kernels (LLVM IR in ``@intrinsic`` functions):
splats, and non-temporal ("streaming") stores.

A plain store to a line that is not in cache first reads the line (read for ownership), so an
output costs two memory transfers an element; a non-temporal store writes the line straight to
memory: an elementwise backward that reads two arrays and writes one moves 12 bytes an
element of float32 instead of 16. The line is then not in cache either, so kernels stream
only outputs of at least STREAM_MIN_BYTES (much larger than the L2, a good part of the L3),
whose start would be gone from the caches anyway by the time their end is written.

A streamed vector store needs its address aligned to the vector (32 bytes: the kernels do the
elements before the first aligned one with plain stores), and :func:`store_fence` after the
last one, before anything else may read the output.
"""

from __future__ import annotations

from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

#: Outputs of at least this many bytes are streamed (the L3 here is 32 MB).
STREAM_MIN_BYTES = 1 << 24
#: The alignment of a streamed vector store, in bytes.
STREAM_ALIGN = 32


def ir_splat(builder, value, lanes: int):
    """An LLVM vector of ``lanes`` copies of the scalar IR ``value``."""
    vec = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value,
                                 ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


def ir_store(builder, value, pointer, streaming: bool, align: int):
    """Store ``value`` at ``pointer``: a non-temporal store aligned to STREAM_ALIGN if
    ``streaming``, else a plain store aligned to ``align``."""
    store = builder.store(value, pointer, align=STREAM_ALIGN if streaming else align)
    if streaming:
        flag = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        store.set_metadata("nontemporal", flag)
    return store


@intrinsic
def store_fence(typingctx):
    """Orders the non-temporal stores before it before every later store (sfence on x86,
    where a seq_cst fence may be a locked instruction, which need not drain them)."""
    def codegen(context, builder, sig, args):
        if llvm.get_process_triple().startswith(("x86_64", "i686")):
            sfence = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def address(typingctx, a):
    """The address of the array a's first element, as an integer."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(a)(context, builder, args[0]).data
        return builder.ptrtoint(data, context.get_value_type(types.intp))

    return types.intp(a), codegen
