"""Backward formulas, shared by the dispatcher path and forced backends.

``register_autograd`` attaches them to ``torch.ops.hmmn_ops.<op>`` (backward calls the
``<op>_backward`` op, so it dispatches like the forward). A forced backend
(``backend="reference"`` etc.) runs under ``_ForcedOp``, which saves the same tensors and calls
that backend's ``<op>_backward``.
"""
import torch


def _read_setup(ctx, inputs, output):
    query_key, memory_key, memory_value, centers, sigma, scale = inputs[:6]
    out, lse = output[:2]
    ctx.save_for_backward(query_key, memory_key, memory_value, centers, sigma, out, lse)
    ctx.scale = scale


def _read_backward(ctx, impl, grad_out, *_):
    query_key, memory_key, memory_value, centers, sigma, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = impl.kernel_guided_read_backward(grad_out, query_key, memory_key, memory_value, centers, sigma, out, lse,
                                             ctx.scale)
    return (*grads, None, None, None, None, None)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _softmax_backward(ctx, impl, grad_output):
    (output,) = ctx.saved_tensors
    return impl.gaussian_softmax_backward(grad_output, output), None, None, None, None


def _topk_setup(ctx, inputs, output):
    query_key, memory_key, memory_value, topk_indices, scale, ratio = inputs
    out, lse = output
    ctx.save_for_backward(query_key, memory_key, memory_value, topk_indices, out, lse)
    ctx.scale, ctx.ratio = scale, ratio


def _topk_backward(ctx, impl, grad_out, *_):
    query_key, memory_key, memory_value, topk_indices, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = impl.topk_guided_read_backward(grad_out, query_key, memory_key, memory_value, topk_indices, out, lse,
                                           ctx.scale, ctx.ratio)
    return (*grads, None, None, None)


def _memory_read_setup(ctx, inputs, output):
    query_key, memory_key, memory_value, shrinkage, selection, similarity, scale = inputs[:7]
    out, lse, indices, usage = output
    ctx.mark_non_differentiable(lse, indices, usage)
    ctx.save_for_backward(query_key, memory_key, memory_value, shrinkage, selection, out, lse, indices)
    ctx.similarity, ctx.scale = similarity, scale


def _memory_read_backward(ctx, impl, grad_out, *_):
    query_key, memory_key, memory_value, shrinkage, selection, out, lse, indices = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, d_shrinkage, d_selection = impl.memory_read_backward(
        grad_out, query_key, memory_key, memory_value, shrinkage, selection, out, lse, indices, ctx.similarity,
        ctx.scale)
    # The selected set of a top-k read is held fixed: topk and the indices get no gradient.
    return (dq, dk, dv, d_shrinkage if shrinkage is not None else None,
            d_selection if selection is not None else None, None, None, None, None)


# op -> (setup_context, backward(ctx, impl, *grads))
FORMULAS = {
    "kernel_guided_read": (_read_setup, _read_backward),
    "gaussian_softmax": (_softmax_setup, _softmax_backward),
    "topk_guided_read": (_topk_setup, _topk_backward),
    "memory_read": (_memory_read_setup, _memory_read_backward),
}
DIFFERENTIABLE = tuple(FORMULAS)


class _Dispatcher:
    def __getattr__(self, op):
        return getattr(torch.ops.hmmn_ops, op)


def register():
    dispatcher = _Dispatcher()
    for op, (setup, backward) in FORMULAS.items():
        torch.library.register_autograd(
            f"hmmn_ops::{op}",
            lambda ctx, *grads, _backward=backward: _backward(ctx, dispatcher, *grads),
            setup_context=setup,
        )


class _ForcedOp(torch.autograd.Function):
    @staticmethod
    def forward(op, impl, *args):
        return getattr(impl, op)(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, impl, *args = inputs
        ctx.op, ctx.impl = op, impl
        outputs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*outputs[1:])
        FORMULAS[op][0](ctx, args, output)

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *FORMULAS[ctx.op][1](ctx, ctx.impl, *grads))


def run_forced(op, impl, args):
    return _ForcedOp.apply(op, impl, *args)
