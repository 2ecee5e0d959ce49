"""The NAS-Bench-201 space (Dong & Yang, 2020): 5 ops on a 4-node, 6-edge cell."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import Block, CellSpace, Paths

NB201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")


class NB201Genotype(tuple):
    """Per intermediate node (1, 2, 3), its (op, input) pairs; prints as the benchmark's arch string."""

    __slots__ = ()

    def __new__(cls, nodes: Sequence[Sequence[tuple[str, int]]]) -> "NB201Genotype":
        return super().__new__(cls, (tuple((str(op), int(src)) for op, src in node) for node in nodes))

    @property
    def arch_str(self) -> str:
        return "+".join("|" + "|".join(f"{op}~{src}" for op, src in node) + "|" for node in self)

    def __str__(self) -> str:
        return self.arch_str

    def __repr__(self) -> str:
        return f"NB201Genotype({self.arch_str!r})"


class NB201Space(CellSpace):
    name = "nb201"
    ops = NB201_OPS
    cell_types = ("cell",)
    num_input_nodes = 1
    num_nodes = 3
    pool_batchnorm = False
    stem_multiplier = 1
    preprocess_inputs = False
    final_activation = True
    training_extras = False

    # --- network skeleton -----------------------------------------------------------------------
    @property
    def output_nodes(self) -> tuple[int, ...]:
        """The last node is the cell's output."""
        return (self.num_input_nodes + self.num_nodes - 1,)

    def blocks(self, C: int, layers: int) -> list[Block]:
        """Three stages of `layers` cells (C, 2C, 4C channels) joined by residual reduction blocks."""
        out = []
        for stage, C_stage in enumerate((C, 2 * C, 4 * C)):
            if stage:
                out.append(Block("residual", C_stage, True))
            out += [Block("cell", C_stage, False)] * layers
        return out

    def parse(self, text: str) -> NB201Genotype:
        """Parses `|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|...~0|...~1|...~2|`."""
        if isinstance(text, NB201Genotype):
            return self.validate(text)
        if not isinstance(text, str):
            raise ValueError(f"malformed arch string: expected a string, got {type(text).__name__}")
        parts = text.strip().split("+")
        nodes = []
        for part in parts:
            if len(part) < 2 or not part.startswith("|") or not part.endswith("|"):
                raise ValueError(f"malformed arch string {text!r}: node {part!r} must look like '|op~input|...|'")
            node = []
            for item in part[1:-1].split("|"):
                op, sep, src = item.partition("~")
                if not sep or not src.isdigit():
                    raise ValueError(f"malformed arch string {text!r}: {item!r} must look like 'op~input'")
                node.append((op, int(src)))
            nodes.append(node)
        return self.validate(NB201Genotype(nodes))

    def format(self, genotype: Any) -> str:
        return self.validate(genotype).arch_str

    def validate(self, genotype: Any) -> NB201Genotype:
        if isinstance(genotype, str):
            return self.parse(genotype)
        try:
            genotype = NB201Genotype(genotype)
        except (TypeError, ValueError):
            raise ValueError(f"malformed NB201 genotype {genotype!r}: expected per node a list of (op, input)") from None
        if len(genotype) != self.num_nodes:
            raise ValueError(f"genotype does not fit the nb201 space: {len(genotype)} nodes; expected {self.num_nodes}")
        for i, node in enumerate(genotype, start=1):
            srcs = [src for _, src in node]
            if srcs != list(range(i)):
                raise ValueError(f"genotype does not fit the nb201 space: node {i} takes inputs {srcs}; "
                                 f"expected {list(range(i))} in order")
            for op, _ in node:
                self.op_index(op)
        return genotype

    def derive(self, weights: Mapping[str, torch.Tensor]) -> NB201Genotype:
        """NAS-Bench-201's rule: the argmax op of every edge, `none` included."""
        self.check_weights(weights)
        best = weights["cell"].detach().float().cpu().argmax(dim=1).tolist()
        return self.from_paths({"cell": best})

    def to_paths(self, genotype: Any) -> Paths:
        genotype = self.validate(genotype)
        return {"cell": tuple(self.ops.index(op) for node in genotype for op, _ in node)}

    def from_paths(self, paths: Mapping[str, Sequence[int | None]]) -> NB201Genotype:
        path = paths["cell"]
        if len(path) != self.num_edges or any(k is None for k in path):
            raise ValueError(f"an nb201 path needs an op index on each of the {self.num_edges} edges, got {path}")
        nodes = [[(self.ops[path[e]], self.edges[e][1]) for e in self.node_edges(node)]
                 for node in range(1, 1 + self.num_nodes)]
        return NB201Genotype(nodes)

    def signature(self, genotype: Any) -> str:
        """What the cell computes, as a sum of op terms over its input: `none` edges, and edges from nodes
        that compute nothing, drop out; `skip_connect` passes its input's terms on; each node's terms are
        sorted. Cells that differ only in unused edges, in the order of their sums or in which of two
        interchangeable nodes holds what share a signature (NAS-Bench-201's 15,625 cells have 4,930). As in
        the benchmark's own count of unique cells, a convolution of a zero input counts as zero (its batch
        norm's bias is ignored)."""
        path = self.to_paths(genotype)["cell"]
        terms: dict[int, list[str]] = {0: ["x"]}  # per node, the terms it sums ("x": the cell's input)
        for node in range(1, 1 + self.num_nodes):
            node_terms = []
            for e in self.node_edges(node):
                op, source = self.ops[path[e]], terms[self.edges[e][1]]
                if op == "none" or not source:
                    continue
                if op == "skip_connect":
                    node_terms += source
                else:
                    node_terms.append(f"{op}({'+'.join(source)})")
            terms[node] = sorted(node_terms)
        return "+".join(terms[self.num_nodes])

    def random_genotype(self, rng: random.Random) -> NB201Genotype:
        return self.from_paths({"cell": [rng.randrange(len(self.ops)) for _ in range(self.num_edges)]})

    def mutate(self, genotype: Any, rng: random.Random) -> NB201Genotype:
        """Changes the op on one edge (the benchmark's mutation; every edge is always present)."""
        path = list(self.to_paths(genotype)["cell"])
        e = rng.randrange(self.num_edges)
        path[e] = rng.choice([k for k in range(len(self.ops)) if k != path[e]])
        return self.from_paths({"cell": path})
