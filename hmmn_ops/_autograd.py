"""Backward formulas, shared by the dispatcher path and forced backends.

``register_autograd`` attaches them to ``torch.ops.hmmn_ops.<op>`` (backward calls the
``<op>_backward`` op, so it dispatches like the forward). A forced backend
(``backend="reference"`` etc.) runs under an autograd.Function made for that (op, backend)
(``forced_function``), which saves the same tensors and calls that backend's ``<op>_backward``.

The ops are differentiable once: a second derivative (``create_graph=True`` then grad again,
gradgradcheck) raises instead of returning a silently wrong one (docs/reliability.md).
"""
import torch


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on an op's gradients, tied to the tensors they depend on; its backward raises."""

    @staticmethod
    def forward(ctx, op, n, *tensors):
        ctx.op = op
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"hmmn_ops.{ctx.op}: double backward (a derivative of the gradient) is not supported; "
                           "the op is differentiable once (docs/reliability.md)")


def _once(op, backward, args):
    """``backward(*args)``; when autograd records the backward (create_graph=True), its results
    are tied to the floating tensors of ``args`` by a node that refuses to be differentiated."""
    if not torch.is_grad_enabled():
        return backward(*args)
    with torch.no_grad():
        grads = backward(*args)
    single = isinstance(grads, torch.Tensor)
    grads = (grads,) if single else tuple(grads)
    linked = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    grads = _NoDoubleBackward.apply(op, len(grads), *grads, *linked)
    return grads[0] if single else grads


def _read_setup(ctx, inputs, output):
    query_key, memory_key, memory_value, centers, sigma, scale = inputs[:6]
    out, lse = output[:2]
    ctx.save_for_backward(query_key, memory_key, memory_value, centers, sigma, out, lse)
    ctx.scale = scale


def _read_backward(ctx, backward, grad_out, *_):
    query_key, memory_key, memory_value, centers, sigma, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = _once("kernel_guided_read", backward,
                  (grad_out, query_key, memory_key, memory_value, centers, sigma, out, lse, ctx.scale))
    return (*grads, None, None, None, None, None)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _softmax_backward(ctx, backward, grad_output):
    (output,) = ctx.saved_tensors
    return _once("gaussian_softmax", backward, (grad_output, output)), None, None, None, None


def _topk_setup(ctx, inputs, output):
    query_key, memory_key, memory_value, topk_indices, scale, ratio = inputs
    out, lse = output
    ctx.save_for_backward(query_key, memory_key, memory_value, topk_indices, out, lse)
    ctx.scale, ctx.ratio = scale, ratio


def _topk_backward(ctx, backward, grad_out, *_):
    query_key, memory_key, memory_value, topk_indices, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = _once("topk_guided_read", backward,
                  (grad_out, query_key, memory_key, memory_value, topk_indices, out, lse, ctx.scale, ctx.ratio))
    return (*grads, None, None, None)


def _memory_read_setup(ctx, inputs, output):
    query_key, memory_key, memory_value, shrinkage, selection, similarity, scale = inputs[:7]
    out, lse, indices, usage = output
    ctx.mark_non_differentiable(lse, indices, usage)
    ctx.save_for_backward(query_key, memory_key, memory_value, shrinkage, selection, out, lse, indices)
    ctx.similarity, ctx.scale = similarity, scale


def _memory_read_backward(ctx, backward, grad_out, *_):
    query_key, memory_key, memory_value, shrinkage, selection, out, lse, indices = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, d_shrinkage, d_selection = _once(
        "memory_read", backward, (grad_out, query_key, memory_key, memory_value, shrinkage, selection, out, lse,
                                  indices, ctx.similarity, ctx.scale))
    # The selected set of a top-k read is held fixed: topk and the indices get no gradient.
    return (dq, dk, dv, d_shrinkage if shrinkage is not None else None,
            d_selection if selection is not None else None, None, None, None, None)


# op -> (setup_context, backward(ctx, <op>_backward function, *grads))
FORMULAS = {
    "kernel_guided_read": (_read_setup, _read_backward),
    "gaussian_softmax": (_softmax_setup, _softmax_backward),
    "topk_guided_read": (_topk_setup, _topk_backward),
    "memory_read": (_memory_read_setup, _memory_read_backward),
}
DIFFERENTIABLE = tuple(FORMULAS)


def register():
    for op, (setup, backward) in FORMULAS.items():
        torch.library.register_autograd(
            f"hmmn_ops::{op}",
            lambda ctx, *grads, _op=op, _backward=backward: _backward(
                ctx, getattr(torch.ops.hmmn_ops, f"{_op}_backward"), *grads),
            setup_context=setup,
        )


_FORCED = {}  # (op, backend) -> its autograd.Function


def forced_function(op, backend, impl):
    """The autograd.Function that runs ``backend``'s ``op`` (``impl.<op>``) under ``op``'s formula
    with ``impl.<op>_backward``. One class per (op, backend), everything it calls fixed on the
    class so that torch.compile(fullgraph=True) traces it; made once, outside any trace
    (backends.py makes the reference and native ones at import)."""
    key = (op, backend)
    if key not in _FORCED:
        setup, formula = FORMULAS[op]
        forward, backward = getattr(impl, op), getattr(impl, f"{op}_backward")

        def run(ctx, *args):
            output = forward(*args)
            if isinstance(output, tuple):  # (out, lse[, indices]): only out is differentiable
                ctx.mark_non_differentiable(*output[1:])
            setup(ctx, args, output)
            return output

        _FORCED[key] = type(f"{op}_{backend}", (torch.autograd.Function,), {
            "forward": staticmethod(run),
            "backward": staticmethod(lambda ctx, *grads: formula(ctx, backward, *grads)),
        })
    return _FORCED[key]


def run_forced(op, backend, impl, args):
    return forced_function(op, backend, impl).apply(*args)
