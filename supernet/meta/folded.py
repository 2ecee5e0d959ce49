"""A SearchNetwork's forward pass for a stack of tasks at once, each task with its own parameters.

The tasks are folded into the channels: a stack of T tasks' images (T, N, C, H, W) runs as one
(N, T*C, H, W) tensor. A convolution with per-task weights is then one grouped convolution (T times
the groups), batch norm one call whose per-channel batch statistics are per task (MAML's per-task
batch norm), and ReLU and pools do not care. `torch.func.vmap` over `functional_call`, the reference
path (`supernet.meta.learner`), computes the same numbers op by op; this path also shares work that the
candidate modules cannot share among themselves (bench/bench_meta_step.py times the two):

  - per state, its ReLU and its average pool once for every edge leaving it (the pool as a depthwise
    convolution with a ones kernel: a quarter of `avg_pool2d`'s time with count_include_pad=False);
  - per state, one convolution for all the conv-BN candidates of one shape on every edge leaving it,
    and one batch norm for them whose weight is each candidate's mixing weight (no separate products);
  - second-order MAML differentiates convolutions and batch norms through `ConvGradients` and
    `BatchNormGradients`, whose backward passes cost a fraction of PyTorch's generic double backward.

Covered: softmax mixing on cells without input preprocessing whose candidates are the identity,
average pools and ReLU-conv-BN stacks (the nb201 space); `unsupported(network)` names what is not,
and the meta-learner then runs the reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import Identity, ReLUSequential
from ..search_network import ResNetBasicBlock, SearchCell, SearchNetwork

Params = dict[str, torch.Tensor]


def _candidate_problem(op: nn.Module) -> str | None:
    """Why a candidate module cannot run folded, or None."""
    if isinstance(op, Identity):
        return None
    if isinstance(op, nn.AvgPool2d):
        return None if not op.ceil_mode and op.divisor_override is None else "an average pool with ceil_mode"
    if isinstance(op, ReLUSequential) and all(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)) for m in op):
        return None
    return f"candidate {type(op).__name__}"


def unsupported(network: SearchNetwork) -> str | None:
    """What in `network` the folded forward does not cover, or None when it covers all of it."""
    if network.mixing.name != "softmax":
        return f"mixing {network.mixing.name!r}"
    for cell in network.cells:
        if isinstance(cell, SearchCell):
            if any(name.startswith("preprocess") for name, _ in cell.named_children()):
                return "cells with input preprocessing"
            for edge in cell.edges:
                for op in edge.ops.values():
                    problem = _candidate_problem(op)
                    if problem:
                        return problem
        elif not isinstance(cell, ResNetBasicBlock):
            return f"block {type(cell).__name__}"
    return None


class GroupedConv(torch.autograd.Function):
    """F.conv2d whose backward is itself differentiable through plain grouped convolutions.

    PyTorch's own double backward of a grouped convolution loops over the groups (T x the groups here),
    which made second-order MAML slower folded than vmapped; this Function's backward, `ConvGradients`,
    differentiates with one grouped convolution per term instead.
    """

    @staticmethod
    def forward(x, weight, bias, conv):
        return F.conv2d(x, weight, bias, *conv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, conv = inputs
        ctx.save_for_backward(x, weight)
        ctx.conv = conv

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = ConvGradients.apply(x, weight, grad_out, ctx.conv, ctx.needs_input_grad[:2])
        grad_bias = grad_out.sum(dim=(0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def _conv_backward(grad_out, x, weight, conv, mask):
    stride, padding, dilation, groups = conv
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False, [0, 0],
                                               groups, [mask[0], mask[1], False])[:2]


class ConvGradients(torch.autograd.Function):
    """(d/dx, d/dweight) of <grad_out, conv(x, weight)>, differentiable once (second-order MAML needs no more).

    Both are bilinear, so their derivatives are convolutions too: with incoming (gg_x, gg_weight),
    d/dgrad_out = conv(gg_x, weight) + conv(x, gg_weight), d/dweight = the weight gradient of conv(gg_x, .)
    at grad_out, d/dx = the input gradient of conv(., gg_weight) at grad_out.
    """

    @staticmethod
    def forward(x, weight, grad_out, conv, mask):
        return _conv_backward(grad_out, x, weight, conv, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, grad_out, conv, mask = inputs
        ctx.save_for_backward(x, weight, grad_out)
        ctx.conv, ctx.mask = conv, mask

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gg_x, gg_weight):
        x, weight, grad_out = ctx.saved_tensors
        conv = ctx.conv
        gg_x = gg_x if ctx.mask[0] else None
        gg_weight = gg_weight if ctx.mask[1] else None
        need_x, need_weight, need_out = ctx.needs_input_grad[:3]
        d_out = d_weight = d_x = None
        if need_out:
            terms = [F.conv2d(a, b, None, *conv) for a, b in ((gg_x, weight), (x, gg_weight))
                     if a is not None and b is not None]
            d_out = sum(terms[1:], terms[0]) if terms else None
        # d/dx depends on the weight only and d/dweight on the input only: one call with (gg_x, gg_weight)
        want_x, want_weight = need_x and gg_weight is not None, need_weight and gg_x is not None
        if want_x or want_weight:
            d_x, d_weight = _conv_backward(grad_out, x if gg_x is None else gg_x,
                                           weight if gg_weight is None else gg_weight, conv, (want_x, want_weight))
        return d_x, d_weight, d_out, None, None


class BatchNorm(torch.autograd.Function):
    """Training-mode batch norm (batch statistics, no running ones) with a weight, whose backward is
    differentiable through `BatchNormGradients`: PyTorch's own double backward of batch norm cost about 11 ms
    a call here, three times the forward and backward together."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = BatchNormGradients.apply(x, weight, grad_out, mean, invstd, ctx.eps)
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None


class BatchNormGradients(torch.autograd.Function):
    """(d/dx, d/dweight, d/dbias) of <g, batch_norm(x)>, differentiable once (second-order MAML needs no more).

    Per channel, with M values, r = 1/sqrt(var + eps), x^ = (x - mean) r, and a bar for a mean over the M:
        d/dx = weight r (g - g_bar - x^ Q / M),  d/dweight = Q = sum g x^,  d/dbias = sum g.
    Given incoming (a, c, d) for the three, with P = sum a x^ and A = sum a (g - g_bar):
        d/dg      = weight r (a - a_bar - x^ P / M) + c x^ + d
        d/dweight = r (A - P Q / M)
        d/dx      = -(weight r^2 / M) ((A - 3 P Q / M) x^ + Q (a - a_bar) + P (g - g_bar))
                    + c r (g - g_bar - x^ Q / M)
    (x^ and r depend on x: d x^_i / d x_j = r (delta_ij - 1/M - x^_i x^_j / M), d r / d x_j = -r^2 x^_j / M.)
    """

    @staticmethod
    def forward(ctx, x, weight, grad_out, mean, invstd, eps):
        grads = torch.ops.aten.native_batch_norm_backward(grad_out, x, weight, None, None, mean, invstd, True, eps,
                                                          [True, True, True])
        ctx.save_for_backward(x, weight, grad_out, mean, invstd, grads[1], grads[2])
        return grads

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, a, c, d):
        x, weight, g, mean, invstd, q, g_sum = ctx.saved_tensors
        m = x.numel() // x.shape[1]
        dims = (0, 2, 3)

        def ch(v):  # a per-channel vector against (N, C, H, W)
            return v[:, None, None]

        x_hat = (x - ch(mean)) * ch(invstd)
        g_centered = g - ch(g_sum / m)
        d_x = d_weight = d_g = None
        if a is not None:
            a_centered = a - ch(a.mean(dim=dims))
            p = (a * x_hat).sum(dim=dims)
            big_a = (a * g_centered).sum(dim=dims)
            d_g = ch(weight * invstd) * (a_centered - x_hat * ch(p / m))
            d_weight = invstd * (big_a - p * q / m)
            d_x = ch(-weight * invstd**2 / m) * (x_hat * ch(big_a - 3 * p * q / m) + a_centered * ch(q)
                                                 + g_centered * ch(p))
        if c is not None:
            d_x_c = ch(c * invstd) * (g_centered - x_hat * ch(q / m))
            d_x = d_x_c if d_x is None else d_x + d_x_c
            d_g = x_hat * ch(c) if d_g is None else d_g + x_hat * ch(c)
        if d is not None:
            d_g = ch(d).expand_as(g) if d_g is None else d_g + ch(d)
        return d_x, d_weight, d_g, None, None, None


class AddScaled(torch.autograd.Function):
    """acc + y * scale for y (N, T, ...) and a per-task scale (1, T, 1, ...); acc may be None.

    torch.addcmul's backward spends a pass over y multiplying it by its scalar `value` and another writing
    grad * y before summing it; here the scale's gradient is one dot product per task. Differentiable again
    (second-order MAML), being plain torch operations.
    """

    @staticmethod
    def forward(ctx, acc, y, scale):
        ctx.save_for_backward(y, scale)
        ctx.has_acc = acc is not None
        return y * scale if acc is None else torch.addcmul(acc, y, scale)

    @staticmethod
    def backward(ctx, grad):
        y, scale = ctx.saved_tensors
        n, t = y.shape[:2]
        grad_scale = None
        if ctx.needs_input_grad[2]:
            grad_scale = torch.linalg.vecdot(grad.reshape(n, t, -1), y.reshape(n, t, -1)).sum(dim=0).view_as(scale)
        return grad if ctx.has_acc else None, grad * scale, grad_scale


def grouped_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                 groups: int) -> torch.Tensor:
    """F.conv2d through GroupedConv (its double backward stays grouped)."""
    return GroupedConv.apply(x, weight, bias, (tuple(stride), tuple(padding), tuple(dilation), groups))


def _conv_bn(op: nn.Module) -> tuple | None:
    """For ReLU -> convolution -> non-affine batch norm (nb201's nor_conv_*), what candidates sharing one
    convolution must agree on; None for any other op."""
    if not isinstance(op, ReLUSequential) or len(op) != 3:
        return None
    conv, bn = op[1], op[2]
    if not (isinstance(conv, nn.Conv2d) and conv.groups == 1 and isinstance(bn, nn.BatchNorm2d) and not bn.affine):
        return None
    return conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.bias is None, bn.eps


def fold(x: torch.Tensor) -> torch.Tensor:
    """(T, N, C, H, W) -> (N, T*C, H, W): task t's channels are t*C ... t*C + C - 1."""
    t, n, c, h, w = x.shape
    return x.transpose(0, 1).reshape(n, t * c, h, w)


class TaskFoldedNetwork:
    """`network`'s forward for T tasks at once: `self(params, x)` with every parameter stacked (T, ...)."""

    def __init__(self, network: SearchNetwork) -> None:
        problem = unsupported(network)
        if problem is not None:
            raise ValueError(f"the folded meta-learning path does not cover {problem}; use the reference path")
        self.network = network
        self.names = {module: name for name, module in network.named_modules()}
        self._counts: dict[tuple, torch.Tensor] = {}

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Logits (T, N, classes) of x (T, N, C, H, W), task t run with parameters params[name][t]."""
        net = self.network
        self.params, self.tasks = params, x.shape[0]
        try:
            h = self.module(net.stem, fold(x))
            for cell in net.cells:
                h = self.cell(cell, h) if isinstance(cell, SearchCell) else self.basic_block(cell, h)
            if net.space.final_activation:
                h = self.module(net.lastact, h)
            features = h.mean(dim=(2, 3)).view(h.shape[0], self.tasks, -1)  # (N, T, F)
            weight, bias = self.param(net.classifier, "weight"), self.param(net.classifier, "bias")
            return torch.einsum("ntf,tkf->tnk", features, weight) + bias[:, None, :]
        finally:
            self.params = None

    # --- modules ----------------------------------------------------------------------------------
    def param(self, module: nn.Module, name: str) -> torch.Tensor | None:
        if getattr(module, name, None) is None:
            return None
        return self.params[f"{self.names[module]}.{name}"]

    def module(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A plain module (conv, batch norm, ReLU, pool, a sequence of them) on the folded x."""
        if isinstance(module, nn.Sequential):
            for m in module:
                x = self.module(m, x)
            return x
        if isinstance(module, nn.Conv2d):
            weight, bias = self.param(module, "weight"), self.param(module, "bias")
            return grouped_conv(x, weight.flatten(0, 1), None if bias is None else bias.flatten(),
                                module.stride, module.padding, module.dilation, module.groups * self.tasks)
        if isinstance(module, nn.BatchNorm2d):
            weight, bias = self.param(module, "weight"), self.param(module, "bias")
            return self.batch_norm(module, x, None if weight is None else weight.flatten(),
                                   None if bias is None else bias.flatten())
        if isinstance(module, nn.ReLU):
            return torch.relu(x)
        if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d, Identity)):
            return module(x)
        raise ValueError(f"the folded forward has no rule for {type(module).__name__}")

    @staticmethod
    def batch_norm(module: nn.BatchNorm2d, x: torch.Tensor, weight: torch.Tensor | None,
                   bias: torch.Tensor | None) -> torch.Tensor:
        # batch statistics always: the learner runs in train mode on private buffers it then drops,
        # so the running statistics never reach an output
        return BatchNorm.apply(x, weight, bias, module.eps)

    def basic_block(self, block: ResNetBasicBlock, x: torch.Tensor) -> torch.Tensor:
        return self.module(block.conv_b, self.module(block.conv_a, x)) + self.module(block.downsample, x)

    # --- cells ------------------------------------------------------------------------------------
    def cell(self, cell: SearchCell, x: torch.Tensor) -> torch.Tensor:
        """A softmax-mixed cell: node n = sum over its edges e and candidates k of w[e, k] * op_k(state).

        Computed source by source: every edge leaving a state shares its ReLU, its average pool and one
        convolution for all its conv-BN candidates alike; node sums are kept (N, T, C, H, W).
        """
        space = cell.space
        weights = F.softmax(self.params[f"alphas_{cell.cell_type}"], dim=-1)  # (T, edges, ops)
        states = [x] * space.num_input_nodes
        sums: dict[int, torch.Tensor] = {}
        last = space.num_input_nodes + space.num_nodes - 1
        for src in range(last):
            if src >= space.num_input_nodes:
                states.append(sums.pop(src).flatten(1, 2))
            leaving = [e for e, (_, s) in enumerate(space.edges) if s == src]
            for node, y, scale in self.source_terms(cell, states[src], leaving, weights):
                if node not in sums:
                    sums[node] = y if scale is None else AddScaled.apply(None, y, scale)
                else:
                    sums[node] = sums[node] + y if scale is None else AddScaled.apply(sums[node], y, scale)
        states.append(sums.pop(last).flatten(1, 2))
        outputs = [states[n] for n in space.output_nodes]
        if len(outputs) == 1:
            return outputs[0]
        n, _, h, w = outputs[0].shape
        return torch.cat([o.view(n, self.tasks, -1, h, w) for o in outputs], dim=2).view(n, -1, h, w)

    def source_terms(self, cell: SearchCell, x: torch.Tensor, edges: list[int],
                     weights: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """(node, y, scale) per candidate k of every edge e leaving x: w[e, k] * op_k(x) is y * scale, or y
        itself when scale is None; y is (N, T, C, H, W), so that one addcmul adds the term to a node sum."""
        space, tasks = cell.space, self.tasks
        n, _, h, w = x.shape
        x5 = x.view(n, tasks, -1, h, w)
        scaled, convs, pooled = [], {}, {}
        relu = None
        for e in edges:
            node = space.edges[e][0]
            for k, name in enumerate(space.ops):
                if name == "none":
                    continue
                op, weight = cell.edges[e].ops[name], weights[:, e, k].view(1, tasks, 1, 1, 1)
                if isinstance(op, Identity):
                    scaled.append((node, x5, weight))
                elif isinstance(op, nn.AvgPool2d):
                    key = (op.kernel_size, op.stride, op.padding, op.count_include_pad)
                    if key not in pooled:
                        pooled[key] = self.average_pool(op, x)
                    scaled.append((node, pooled[key].view(n, tasks, -1, *pooled[key].shape[-2:]), weight))
                elif (shape := _conv_bn(op)) is not None:  # one convolution for all alike (conv_terms)
                    convs.setdefault(shape, []).append((node, op, weights[:, e, k]))
                else:
                    relu = torch.relu(x) if relu is None else relu
                    out = self.module(op[1:], relu)
                    scaled.append((node, out.view(n, tasks, -1, *out.shape[-2:]), weight))
        terms = []
        for same_shape in convs.values():
            relu = torch.relu(x) if relu is None else relu
            terms += [(node, y, None) for node, y in self.conv_terms(same_shape, relu)]
        return terms + scaled

    def conv_terms(self, convs: list[tuple[int, nn.Module, torch.Tensor]],
                   relu: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """Conv-BN candidates of one shape on one state: one grouped convolution for all of them and one batch
        norm whose weight is each candidate's mixing weight. (node, output (N, T, C, H, W)) each.

        The conv biases are left out: a batch norm with batch statistics removes them exactly, so their
        gradient is zero (the reference path computes it as rounding noise).
        """
        first, bn = convs[0][1][1], convs[0][1][2]
        kernels = torch.cat([self.param(op[1], "weight") for _, op, _ in convs], dim=1)  # (T, C_out, C_in, k, k)
        gamma = torch.stack([weight for _, _, weight in convs], dim=1).repeat_interleave(first.out_channels, dim=1)
        if first.kernel_size == (1, 1) and first.stride == (1, 1) and first.padding == (0, 0):
            out = self.conv1x1_bn(kernels.flatten(2), relu, gamma, bn.eps)
        else:
            out = grouped_conv(relu, kernels.flatten(0, 1), None, first.stride, first.padding, first.dilation,
                               self.tasks)
            out = self.batch_norm(bn, out, gamma.flatten(), None)
        n, _, h, w = out.shape
        # unbind, not indexing: the backward of each index would fill a zero tensor of out's full size
        parts = out.view(n, self.tasks, len(convs), first.out_channels, h, w).unbind(dim=2)
        return [(node, part) for (node, _, _), part in zip(convs, parts)]

    def conv1x1_bn(self, weight: torch.Tensor, relu: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
        """batch_norm(1x1 conv of relu, weight gamma (T, C_out)) as one matmul, the batch norm folded into it.

        The conv output's batch statistics follow from its input's: per task, mean W mu and variance
        w_o^T Cov w_o (Cov the C_in x C_in covariance of the input channels), so the wide output is written
        once and never read back for statistics or normalised in a pass of its own (6% off a fomaml
        meta-step, 10% off maml's).
        """
        n, _, h, w = relu.shape
        tasks = self.tasks
        r = relu.view(n, tasks, -1, h * w)  # (N, T, C, P)
        m = n * h * w
        mean = r.sum(dim=(0, 3)) / m  # (T, C)
        # E[x x^T] - mean mean^T, not the product of centred copies: a centred copy and its gradient cost two
        # passes over r, and a ReLU's output has no mean large enough against its spread to cancel digits
        second = torch.matmul(r, r.transpose(-1, -2)).sum(dim=0) / m  # (T, C, C)
        cov = second - mean[:, :, None] * mean[:, None, :]
        var = torch.einsum("toc,tcd,tod->to", weight, cov, weight)
        scale = gamma * torch.rsqrt(var + eps)  # (T, O)
        folded = weight * scale[..., None]  # (T, O, C)
        shift = -torch.matmul(folded, mean[..., None])  # (T, O, 1)
        out = torch.baddbmm(shift.expand(n, tasks, -1, 1).reshape(n * tasks, -1, 1),
                            folded.expand(n, tasks, *folded.shape[1:]).reshape(n * tasks, *folded.shape[1:]),
                            r.reshape(n * tasks, -1, h * w))
        return out.view(n, -1, h, w)

    def average_pool(self, pool: nn.AvgPool2d, x: torch.Tensor) -> torch.Tensor:
        """pool(x) as a depthwise convolution with a ones kernel (window sums) over the pool's divisor per pixel:
        a quarter of avg_pool2d's time with count_include_pad=False on the CPU."""
        k, s, p = (v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride, pool.padding))
        ones = x.new_ones(x.shape[1], 1, k, k)
        window_sums = grouped_conv(x, ones, None, (s, s), (p, p), (1, 1), x.shape[1])
        key = (x.shape[-2:], k, s, p, pool.count_include_pad, x.dtype, x.device)
        if key not in self._counts:
            inside = x.new_ones(1, 1, *x.shape[-2:])
            self._counts[key] = F.conv2d(F.pad(inside, (p,) * 4, value=float(pool.count_include_pad)), ones[:1],
                                         stride=s)[0]  # (1, H', W')
        return window_sums / self._counts[key]
