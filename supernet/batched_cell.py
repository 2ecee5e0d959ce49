"""A search cell's nodes computed per source state, in channels_last (the CPU fast path of issue 10).

`cell_nodes(cell, states, plan)` returns the intermediate nodes of one `SearchCell`, the same values (to
float rounding) as the per-edge path of `SearchCell.forward`, computed so:

  * channels_last throughout: the states are made channels_last once; every op used here keeps it.
  * per source state, once: ReLU(state) (shared by every `ops.StartsWithReLU` candidate and factorized
    reduce of every edge reading it), and the parameter-free candidates: each pool with its batch norm
    (`ops.pool_parts`) and skip (`ops.Identity`). The pools' batch norms are non-affine and use batch
    statistics in training, so every edge reading the state gets the same values; each edge's running
    statistics are still updated with those batch statistics, exactly as its own BatchNorm2d would.
  * the weighted node sum without keeping candidate outputs alive: a candidate that ends in a
    non-affine batch norm (sep/dil/nor convs, factorized reduce) runs that batch norm as an affine one
    whose scale is the candidate's mixing weight (expanded over channels, no shift): out = w * BN(y).
    Batch norm's backward needs only y and its statistics (already saved), and gives d/dw =
    sum(g * BN(y)) through the scale's gradient, so neither BN(y) nor w * BN(y) is stored. Node sums are
    plain adds, which store nothing; the shared pool/skip outputs are stored once per state (addcmul).
  * state by state: the terms of every edge leaving a state, candidate by candidate; on small states
    (`STACK_MAX_ELEMENTS`) the same conv candidate of all those edges runs as one chain over their channels
    stacked (`_stacked_chains`: fewer, larger calls where per-call cost dominates).
  * convolutions (`supernet.cpu_convs`): depthwise 'same' convs run through `Depthwise`, whose backward takes,
    by a FIXED rule (`flip_input_grad`, `gradient_as_kernel`, `split_weight_grad`; the measurements are beside
    them), oneDNN's gradients or faster alternatives (input gradient as a forward conv with the flipped kernel;
    weight gradient of 5x5 / dilated kernels as a conv whose kernel is the output gradient, or through oneDNN's
    fast 3x3 weight gradient on polyphase images / 3x3 blocks). A strided dilated depthwise conv runs as a
    stride-1 conv of the subsampled input (`subsampled_depthwise`). 1x1 convs of channels_last tensors run as
    one matmul over the (N*H*W, C) view (two pixels a row on few channels) where `pointwise_pixels_per_row`
    says. The rules read only shapes, never timings, so the same seed gives bitwise the same search on the
    same machine (a prototype timed the alternatives per shape and cached the fastest: runs then differed in
    rounding).

Note: the scale passed to batch norm is a contiguous copy of w expanded over C: with the stride-0 expand itself,
torch 2.13's CPU batch-norm backward on channels_last inputs returned wrong gradients inside the network
(alphas' gradients off by O(1) in float64; not isolated to a small repro).

Applies to training-mode cells with a dense weighted plan (softmax mixing), no PC-DARTS edge
normalisation, and tensors the Triton kernels do not serve (`applies()`); everything else, and CUDA,
stays on the per-edge path of `supernet.dispatch`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch
from .batch_norm import count_batch, count_batches, unbiased_variance, update_running_stats_of, uses_batch_stats_only
from .cpu_convs import BlockDiagonalPointwise, Depthwise, pointwise_mm, pointwise_pixels_per_row, subsampled_depthwise
from .ops import FactorizedReduce, Identity, ReLUSequential, StartsWithReLU, WrappedReLUSequential, pool_parts

CL = torch.channels_last
# Levers, switchable for measurement (bench/bench_search_step.py --levers); all on is the design.
ENABLED = True  # the hook in SearchCell.forward; False restores the per-edge path
LEVERS = {"channels_last": True, "share_pools": True, "share_relu": True, "bn_weighted": True, "dw_backward": True,
          "pw_matmul": True, "dilated_stride": True, "stack_edges": True}


def serves(x: torch.Tensor) -> bool:
    """Whether this module may compute cells on tensors like x: not where the Triton kernels run (CUDA, or
    tests interpreting them on the CPU), nor under torch.compile (which traces the kernels' custom ops), nor
    under autocast (its hand-written depthwise backward and fixed rules were measured in fp32 only)."""
    return (ENABLED and not dispatch._kernels_run(x) and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled(x.device.type))


def applies(cell: nn.Module, plan, x: torch.Tensor) -> bool:
    """Whether `cell_nodes` computes this cell for this plan and inputs like x."""
    if not (cell.training and serves(x)):
        return False
    for node_plan in plan:
        if node_plan.weights is None or node_plan.edge_weights is not None or node_plan.residual is not None:
            return False
    return all(edge.channel_divisor == 1 for edge in cell.edges)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    if not LEVERS["channels_last"] or x.dim() != 4:
        return x
    return x.contiguous(memory_format=CL)


# --- batch norm ---------------------------------------------------------------------------------
def _plain(bn: nn.Module | None) -> bool:
    """A non-affine batch norm normalising with batch statistics, with running statistics if any."""
    return (bn is not None and uses_batch_stats_only(bn)
            and (bn.track_running_stats or bn.running_mean is None))


def weighted_batch_norm(y: torch.Tensor, bn: nn.BatchNorm2d, scale: torch.Tensor) -> torch.Tensor:
    """w * bn(y) for a non-affine batch-statistics batch norm, as one affine batch norm whose scale is the
    mixing weight w repeated over y's channels (`channel_scales`).

    Saves nothing beyond what batch norm saves (its input and statistics)."""
    return F.batch_norm(y, bn.running_mean, bn.running_var, scale, None, True, count_batch(bn), bn.eps)


def channel_scales(weights: torch.Tensor, channels: int) -> torch.Tensor:
    """(P, channels): each of P mixing weights repeated over the channels, made in one call. A contiguous copy,
    not the stride-0 expand itself: see the module's note."""
    return weights[:, None].expand(-1, channels).contiguous()


def shared_batch_norm(y: torch.Tensor, bns: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    """bn(y) for several non-affine batch-statistics batch norms fed the same y: one normalisation, and
    every module's running statistics updated with the same batch statistics."""
    first = bns[0]
    if len(bns) == 1:
        return F.batch_norm(y, first.running_mean, first.running_var, None, None, True, count_batch(first), first.eps)
    # the batch statistics come back from the normalisation itself (a separate var_mean pass over y cost
    # about 1.5% of the small config's step)
    out, mean, invstd = torch.native_batch_norm(y, None, None, first.running_mean, first.running_var, True,
                                                count_batch(first), first.eps)
    with torch.no_grad():
        unbiased = unbiased_variance(invstd.pow(-2) - first.eps, y)
    update_running_stats_of(bns[1:], mean, unbiased)
    return out


def _is_same_depthwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels and conv.bias is None
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.dilation[0] == conv.dilation[1]
            and conv.stride[0] == conv.stride[1] and conv.padding_mode == "zeros"
            and conv.padding == (conv.dilation[0] * (conv.kernel_size[0] - 1) // 2,) * 2)


def _is_pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups == 1 and conv.bias is None
            and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1))


def _depthwise(y: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor | None = None, copies: int = 1) -> torch.Tensor:
    """conv(y) for a 'same' depthwise conv; or that conv's geometry with another `weight` over `copies` copies
    of y side by side (stacked edges)."""
    stride, padding, dilation = conv.stride[0], conv.padding[0], conv.dilation[0]
    if LEVERS["dilated_stride"] and subsampled_depthwise(stride, padding, dilation):
        y = to_channels_last(y[:, :, ::stride, ::stride])
        stride, padding, dilation = 1, padding // stride, dilation // stride
    return Depthwise.apply(y, conv.weight if weight is None else weight, stride, padding, dilation, copies)


def _pointwise(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv of a channels_last y with a (C_out, C_in) weight, by the pointwise rule."""
    pixels = pointwise_pixels_per_row(*y.shape)
    return pointwise_mm(y, weight, pixels) if pixels else F.conv2d(y, weight[:, :, None, None])


# What kind of layer each layer of a candidate is, decided once per candidate module (`_chain`): deciding it
# again for every layer of every candidate in every step cost more Python time than some of the calls.
DEPTHWISE, POINTWISE, CONV, RELU, BATCH_NORM, MODULE = range(6)


def _kind(layer: nn.Module) -> int:
    if _is_same_depthwise(layer):
        return DEPTHWISE
    if _is_pointwise(layer):
        return POINTWISE
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.bias is None and layer.padding_mode == "zeros":
        return CONV  # nb201's nor_conv_3x3: run as declared, stacked as one conv
    if isinstance(layer, nn.ReLU):
        return RELU
    return BATCH_NORM if isinstance(layer, nn.BatchNorm2d) and not layer.affine else MODULE


def _run(kind: int, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """layer(y), by the faster route for its kind where the levers allow."""
    if kind == DEPTHWISE and LEVERS["dw_backward"]:
        return _depthwise(y, layer)
    if kind == POINTWISE and LEVERS["pw_matmul"] and y.dim() == 4 and y.is_contiguous(memory_format=CL):
        return _pointwise(y, layer.weight.flatten(1))
    if kind == RELU:
        return torch.relu(y)
    if kind == BATCH_NORM and _plain(layer):  # what nn.BatchNorm2d.forward calls, without its module call
        return F.batch_norm(y, layer.running_mean, layer.running_var, None, None, True, count_batch(layer), layer.eps)
    return layer(y)


def _layer(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return _run(_kind(layer), layer, y)


# --- candidates ---------------------------------------------------------------------------------
_CHAINS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _chain(op: nn.Module) -> tuple[tuple[tuple[int, nn.Module], ...], nn.Module] | None:
    """The layers `op.after_relu` runs, each with its kind, and the batch norm it ends in, when op is a
    `ReLUSequential` (or wraps one: `WrappedReLUSequential`, as SepConv and DilConv) ending in a non-affine
    batch norm; else None (the op runs as declared). Worked out once per module."""
    if op in _CHAINS:
        return _CHAINS[op]
    chain = None
    seq = op.op if isinstance(op, WrappedReLUSequential) else op
    if isinstance(seq, ReLUSequential):
        layers = list(seq)[1:]
        if len(layers) > 1 and _kind(layers[-1]) == BATCH_NORM:
            chain = tuple((_kind(layer), layer) for layer in layers[:-1]), layers[-1]
    _CHAINS[op] = chain
    return chain


def _factorized_reduce(fr: FactorizedReduce, r: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    """FactorizedReduce(x) given r = ReLU(x), before its batch norm; and that batch norm."""
    h, wd = r.shape[-2:]
    # on even sides the shifted branch never samples FactorizedReduce's padding: skip the copy
    shifted = r[:, :, 1:, 1:] if h % 2 == 0 and wd % 2 == 0 else F.pad(r, (0, 1, 0, 1))[:, :, 1:, 1:]
    return torch.cat([fr.conv_1(r), fr.conv_2(shifted)], dim=1), fr.bn


class _State:
    """What is computed once per source state: its ReLU and its parameter-free candidates."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self._relu = None
        self.pools: dict[tuple[str, int], torch.Tensor] = {}

    def relu(self) -> torch.Tensor:
        if not LEVERS["share_relu"]:
            return torch.relu(self.x)
        if self._relu is None:
            self._relu = torch.relu(self.x)
        return self._relu


def _pool_bns(edges, readers: list[int], name: str) -> list[nn.BatchNorm2d] | None:
    """The batch norms after pool `name` on the edges in `readers` ([] for pools without one), when all
    are shareable; else None."""
    bns = [pool_parts(edges[e].ops[name])[1] for e in readers]
    if all(bn is None for bn in bns):
        return []
    return bns if all(_plain(bn) for bn in bns) else None


def _stride(pool: nn.Module) -> int:
    return pool.stride if isinstance(pool.stride, int) else pool.stride[0]


# --- candidates of one kind on several edges, stacked along channels ------------------------------
# The edges leaving one state apply the same candidate (e.g. sep_conv_3x3) with their own weights to the same
# ReLU(state). Stacked along channels (edge-major), E edges' chains run as one: the first depthwise conv on E
# copies of the input, every later depthwise conv over E*C channels, pointwise convs as one matmul against the
# edges' weights side by side (the first) or block-diagonal (later ones), batch norms over E*C channels (per
# channel, so the same statistics as per edge): fewer, larger calls where per-call cost dominates.
# Stacked against separate chains, forward + backward, 4 edges, N 32 (`python bench/bench_cpu_rules.py`, idle,
# 1 thread): 3x3 candidates 0.81-0.87x on 8x8 and 4x4 states (0.58-0.69x with 2 threads); sep_conv_5x5 0.81x
# on 4x4, 1.22x on 8x8; dil_conv_5x5 1.6-1.85x. In the whole small-config step, running those 5x5 cases
# separately gained nothing (a one-off A/B: paired 0.99-1.07 at 1 thread, 1.03 at 2), so the rule reads the
# state's size only.
# On the paper config's states (N 64, 8x8 and up: 1.6-3.4x isolated; stacking its 8x8 stage cost 1.07x in the
# whole step) the arithmetic outweighs the calls saved. The small config's 16x16 stage (N 32, C 8) measured
# 1.03-1.39x isolated once; re-measured on 2026-11-29 it reads 0.68-1.05x, and stacking it gains in the whole step
# (one-off A/B after `_ConcatChannels`, paired: 0.946-0.957 on one thread, 0.866-0.892 on two). So do the inputs
# of its first reduction cell (N 32, C 16, 16x16: 131,072 elements; whole step 0.965-0.98 on two threads, 0.986 on
# one). The rule reads the state's size, N*C*H*W: above STACK_MAX_ELEMENTS the edges run one by one.
STACK_MAX_ELEMENTS = 131072
_STACKABLE_LAYERS = (DEPTHWISE, POINTWISE, RELU, BATCH_NORM)


def _stackable(chain) -> bool:
    """Whether a candidate's chain may run stacked with the same candidate of other edges."""
    layers, final = chain
    return (LEVERS["stack_edges"] and LEVERS["dw_backward"] and LEVERS["pw_matmul"] and LEVERS["bn_weighted"]
            and layers[0][0] in (DEPTHWISE, POINTWISE, CONV)
            and all(kind in _STACKABLE_LAYERS for kind, _ in layers[1:])
            and all(_plain(layer) and layer.momentum is not None for kind, layer in layers if kind == BATCH_NORM)
            and _plain(final) and final.momentum is not None)


def _stacked_batch_norm(y: torch.Tensor, bns: Sequence[nn.BatchNorm2d], scale: torch.Tensor | None) -> torch.Tensor:
    """The E plain batch norms `bns` of E edges stacked along y's channels, as one; `scale`: the mixing weights
    over the channels (or None). Each module's running statistics move as its own batch norm would move them."""
    first = bns[0]
    factor = count_batches(bns)  # the same momentum (`_stackable`): the same factor
    if first.running_mean is None:
        return F.batch_norm(y, None, None, scale, None, True, factor, first.eps)
    running = [bn.running_mean for bn in bns] + [bn.running_var for bn in bns]
    mean, var = torch.cat(running[:len(bns)]), torch.cat(running[len(bns):])
    out = F.batch_norm(y, mean, var, scale, None, True, factor, first.eps)
    with torch.no_grad():
        torch._foreach_copy_(running, mean.chunk(len(bns)) + var.chunk(len(bns)))
    return out


def _stacked_chains(chains: Sequence, r: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w_e * chain_e(r) for E >= 2 stackable chains of the same candidate given r = ReLU(state) and their mixing
    weights (E,): one chain over E*C channels, edge-major along the channels."""
    n = len(chains)
    y = r
    for step, layers in enumerate(zip(*(chain[0] for chain in chains))):
        kind, first = layers[0]
        modules = [layer for _, layer in layers]
        if kind == DEPTHWISE:  # the first on E copies of the input, edge-major along channels
            y = _depthwise(y, first, torch.cat([m.weight for m in modules]), copies=n if step == 0 else 1)
        elif kind == POINTWISE:
            stacked = torch.stack([m.weight for m in modules]).flatten(2)  # (E, O, C)
            if step == 0:  # one input for every edge: their weights one above the other
                y = _pointwise(y, stacked.flatten(0, 1))
            else:
                y = BlockDiagonalPointwise.apply(y, stacked)
        elif kind == CONV:  # the first layer only (`_stackable`): the edges' kernels one above the other
            y = F.conv2d(y, torch.cat([m.weight for m in modules]), None, first.stride, first.padding,
                         first.dilation)
        elif kind == RELU:
            y = torch.relu(y)
        else:
            y = _stacked_batch_norm(y, modules, None)
    c = y.shape[1] // n
    scale = channel_scales(weights, c).view(-1)
    return _stacked_batch_norm(y, [chain[1] for chain in chains], scale)


# --- the cell -----------------------------------------------------------------------------------
class _ConcatChannels(torch.autograd.Function):
    """torch.cat along channels whose backward hands each input a channels_last copy of its part of the gradient.

    cat's own backward hands out channel slices of the output's gradient (or NCHW ones, from the classifier's
    pooling), and CPU batch norm's backward on such a gradient of a channels_last input took 2-6x as long as on a
    channels_last one (32x16x8x8: 128 against 38 us with the copy, one thread): one copy per node serves every
    batch norm its gradient reaches.
    """

    @staticmethod
    def forward(ctx, *parts: torch.Tensor) -> torch.Tensor:
        ctx.sizes = [part.shape[1] for part in parts]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(part.contiguous(memory_format=CL) for part in grad.split(ctx.sizes, dim=1))


def cell_output(space, states: Sequence[torch.Tensor]) -> torch.Tensor:
    """`space.cell_output(states)` for the channels_last nodes of `cell_nodes`."""
    outputs = [states[n] for n in space.output_nodes]
    return outputs[0] if len(outputs) == 1 else _ConcatChannels.apply(*outputs)


def cell_nodes(cell: nn.Module, states: Sequence[torch.Tensor], plan) -> list[torch.Tensor]:
    """The intermediate nodes of a `SearchCell` (in order), given its preprocessed input states and a plan:
    per node, `pairs` [(edge, op index)] and `weights` (one per pair).

    Computed state by state (a node becomes a state once every edge into it is summed): the terms of every
    edge leaving a state, candidate by candidate, so that one candidate's edges can run stacked. Each node sums
    its terms state by state (within a state, the stacked candidates' sum last): the per-edge path's terms in
    another order, so the sums round differently."""
    space, edges = cell.space, cell.edges
    states = [to_channels_last(s) for s in states]
    info = [_State(s) for s in states]
    n_in = len(states)
    # Which edges read each (state, pool) in this plan: their batch norms share one normalisation.
    readers: dict[tuple[int, str], list[int]] = {}
    # The pairs leaving each state, per candidate: (node, position in the node's pairs, edge).
    leaving: dict[int, dict[int, list[tuple[int, int, int]]]] = {}
    for j, node_plan in enumerate(plan):
        for i, (e, k) in enumerate(node_plan.pairs):
            src = space.edges[e][1]
            leaving.setdefault(src, {}).setdefault(k, []).append((j, i, e))
            if space.ops[k] in dispatch.POOLS:
                readers.setdefault((src, space.ops[k]), []).append(e)
    weights = [node_plan.weights.unbind(0) for node_plan in plan]
    totals: list[torch.Tensor | None] = [None] * len(plan)
    scales: list = [None] * len(plan)

    def add(j: int, term: torch.Tensor) -> None:
        totals[j] = term if totals[j] is None else totals[j] + term

    def finish(j: int) -> torch.Tensor:
        total = totals[j]
        if total is None:  # every chosen op is `none`
            ref = states[0]
            return ref[:, :, ::2, ::2].mul(0.0) if cell.reduction else ref.mul(0.0)
        return to_channels_last(total)

    for src in range(n_in + len(plan) - 1):
        if src >= n_in:  # every edge into node src - n_in is summed: it is a state now
            info.append(_State(finish(src - n_in)))
        st = info[src]
        x = st.x
        # The stacked candidates whose edges (and so nodes) are the same, summed before the split: one sum over
        # E*C channels per candidate and one split per state, instead of E adds of channel slices per candidate.
        stacked_sums: dict[tuple, torch.Tensor] = {}
        for k in sorted(leaving.get(src, {})):
            name, group = space.ops[k], leaving[src][k]
            ops = [edges[e].ops[name] for _, _, e in group]
            chains = [_chain(op) for op in ops]
            small = x.numel() <= STACK_MAX_ELEMENTS
            if len(group) > 1 and small and all(chain is not None and _stackable(chain) for chain in chains):
                w = torch.stack([weights[j][i] for j, i, _ in group])
                out = _stacked_chains(chains, st.relu(), w)
                nodes = tuple((j, e) for j, _, e in group)
                stacked_sums[nodes] = stacked_sums[nodes] + out if nodes in stacked_sums else out
                continue
            for (j, i, _), op, chain in zip(group, ops, chains):
                w = weights[j][i]
                shared = None
                if isinstance(op, Identity):
                    shared = x
                elif name in dispatch.POOLS and LEVERS["share_pools"]:
                    pool = pool_parts(op)[0]
                    key = (name, _stride(pool))
                    shared = st.pools.get(key)
                    if shared is None:
                        bns = _pool_bns(edges, readers[(src, name)], name)
                        if bns is not None:
                            shared = st.pools[key] = shared_batch_norm(pool(x), bns) if bns else pool(x)
                if shared is not None:
                    totals[j] = torch.addcmul(totals[j], w, shared) if totals[j] is not None else w * shared
                    continue
                bn = None
                if isinstance(op, FactorizedReduce):
                    y, bn = _factorized_reduce(op, st.relu())
                elif chain is not None:
                    y = st.relu()
                    for kind, layer in chain[0]:
                        y = _run(kind, layer, y)
                    bn = chain[1]
                if bn is not None and LEVERS["bn_weighted"] and _plain(bn):
                    if scales[j] is None:
                        scales[j] = channel_scales(plan[j].weights, y.shape[1]).unbind(0)
                    term = weighted_batch_norm(y, bn, scales[j][i])
                elif bn is not None:
                    term = w * bn(y)
                elif isinstance(op, StartsWithReLU):
                    term = w * op.after_relu(st.relu())
                else:
                    term = w * op(x)
                add(j, term)
        for nodes, total in stacked_sums.items():
            for (j, _), term in zip(nodes, total.split(total.shape[1] // len(nodes), dim=1)):
                add(j, term)
    return [state.x for state in info[n_in:]] + [finish(len(plan) - 1)]
