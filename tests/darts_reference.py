"""An independent test oracle with the module layout of DARTS's search network (`cnn/model_search.py`).

Written from the paper's definitions, in DARTS's own naming (`_ops`, `preprocess0.op`, positional
primitives, alphas outside the state_dict), so that key mapping and numerics are checked against
something other than our own network.
"""

import torch
import torch.nn.functional as F
from torch import nn

PRIMITIVES = ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
              "dil_conv_3x3", "dil_conv_5x5"]


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, k, stride, pad):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(), nn.Conv2d(C_in, C_out, k, stride, pad, bias=False),
                                nn.BatchNorm2d(C_out, affine=False))

    def forward(self, x):
        return self.op(x)


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=False)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


class Conv(nn.Module):
    """SepConv (repeat=2) or DilConv (repeat=1, dilation 2): `.op` holds the layers."""

    def __init__(self, C, k, stride, pad, dilation, repeat):
        super().__init__()
        layers = []
        for r in range(repeat):
            layers += [nn.ReLU(), nn.Conv2d(C, C, k, stride if r == 0 else 1, pad, dilation=dilation, groups=C, bias=False),
                       nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C, affine=False)]
        self.op = nn.Sequential(*layers)

    def forward(self, x):
        return self.op(x)


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x[:, :, ::self.stride, ::self.stride].mul(0.0)


def make_op(name, C, stride):
    return {
        "none": lambda: Zero(stride),
        "max_pool_3x3": lambda: nn.Sequential(nn.MaxPool2d(3, stride, 1), nn.BatchNorm2d(C, affine=False)),
        "avg_pool_3x3": lambda: nn.Sequential(nn.AvgPool2d(3, stride, 1, count_include_pad=False),
                                              nn.BatchNorm2d(C, affine=False)),
        "skip_connect": lambda: nn.Identity() if stride == 1 else FactorizedReduce(C, C),
        "sep_conv_3x3": lambda: Conv(C, 3, stride, 1, 1, 2),
        "sep_conv_5x5": lambda: Conv(C, 5, stride, 2, 1, 2),
        "dil_conv_3x3": lambda: Conv(C, 3, stride, 2, 2, 1),
        "dil_conv_5x5": lambda: Conv(C, 5, stride, 4, 2, 1),
    }[name]()


class MixedOp(nn.Module):
    def __init__(self, C, stride):
        super().__init__()
        self._ops = nn.ModuleList(make_op(p, C, stride) for p in PRIMITIVES)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class Cell(nn.Module):
    def __init__(self, C_pp, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(C_pp, C) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        self._ops = nn.ModuleList(MixedOp(C, 2 if reduction and j < 2 else 1) for i in range(4) for j in range(2 + i))

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(4):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-4:], dim=1)


class Network(nn.Module):
    def __init__(self, C, num_classes, layers, in_channels=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 3 * C, 3, padding=1, bias=False), nn.BatchNorm2d(3 * C))
        C_pp, C_prev, C_curr = 3 * C, 3 * C, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            C_curr = C_curr * 2 if reduction else C_curr
            self.cells.append(Cell(C_pp, C_prev, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_pp, C_prev = C_prev, 4 * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        self.alphas_normal = 1e-3 * torch.randn(14, len(PRIMITIVES))
        self.alphas_reduce = 1e-3 * torch.randn(14, len(PRIMITIVES))

    def forward(self, x):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            w = F.softmax(self.alphas_reduce if cell.reduction else self.alphas_normal, dim=-1)
            s0, s1 = s1, cell(s0, s1, w)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def genotype_lists(self):
        """DARTS's derivation rule, as (normal, reduce) lists of (op, input)."""
        def parse(W):
            gene, start = [], 0
            none = PRIMITIVES.index("none")
            for i in range(4):
                rows = W[start:start + i + 2]
                strength = [max(rows[j][k] for k in range(len(rows[j])) if k != none) for j in range(i + 2)]
                for j in sorted(range(i + 2), key=lambda j: -strength[j])[:2]:
                    k_best = None
                    for k in range(len(rows[j])):
                        if k != none and (k_best is None or rows[j][k] > rows[j][k_best]):
                            k_best = k
                    gene.append((PRIMITIVES[k_best], j))
                start += i + 2
            return gene
        return (parse(F.softmax(self.alphas_normal, dim=-1).tolist()),
                parse(F.softmax(self.alphas_reduce, dim=-1).tolist()))
