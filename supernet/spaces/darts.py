"""The DARTS space (Liu et al., 2019): 8 primitives, 4-node normal and reduction cells."""

from __future__ import annotations

import ast
import random
from collections import namedtuple
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

import torch

from .base import Block, CellSpace, Paths

PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)

Gene = tuple[tuple[str, int], ...]


class Genotype(namedtuple("Genotype", "normal normal_concat reduce reduce_concat")):
    """DARTS's genotype: two (op, input) pairs per intermediate node, and the nodes concatenated.

    Stored as tuples so genotypes hash and compare; prints exactly as DARTS prints it.
    """

    __slots__ = ()

    def __new__(cls, normal: Iterable, normal_concat: Iterable[int], reduce: Iterable,
                reduce_concat: Iterable[int]) -> "Genotype":
        return super().__new__(cls, _gene(normal, "normal"), _concat(normal_concat, "normal_concat"),
                               _gene(reduce, "reduce"), _concat(reduce_concat, "reduce_concat"))

    def __repr__(self) -> str:
        return (f"Genotype(normal={list(self.normal)}, normal_concat={list(self.normal_concat)}, "
                f"reduce={list(self.reduce)}, reduce_concat={list(self.reduce_concat)})")

    __str__ = __repr__


# Longest concat list a genotype may name; a larger range is refused before it is built.
MAX_CONCAT = 1000


def _gene(pairs: Iterable, field: str) -> Gene:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise ValueError(f"malformed genotype: {field}={pairs!r} is not a list of (op name, input index) pairs")
    out = []
    for pair in pairs:
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str)
                or isinstance(pair[1], bool) or not isinstance(pair[1], int)):
            raise ValueError(f"malformed genotype: {field} entry {pair!r} is not an (op name, input index) pair")
        out.append((pair[0], int(pair[1])))
    if not out or len(out) % 2:
        raise ValueError(f"malformed genotype: {field} has {len(out)} entries; expected two per node")
    return tuple(out)


def _concat(nodes: Iterable[int], field: str) -> tuple[int, ...]:
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, Iterable):
        raise ValueError(f"malformed genotype: {field}={nodes!r} is not a list of node indices")
    if isinstance(nodes, Sized) and len(nodes) > MAX_CONCAT:
        raise ValueError(f"malformed genotype: {field} names {len(nodes)} nodes; at most {MAX_CONCAT} are allowed")
    out = tuple(nodes)
    if not out or not all(isinstance(n, int) and not isinstance(n, bool) for n in out):
        raise ValueError(f"malformed genotype: {field}={nodes!r} is not a non-empty list of node indices")
    return out


def check_cell(gene: Gene, concat: Sequence[int], field: str, known_ops: Iterable[str]) -> None:
    """Structural checks any DARTS-style cell must pass, whatever its number of nodes."""
    known = set(known_ops)
    for i in range(len(gene) // 2):
        node = i + 2
        for op, src in gene[2 * i: 2 * i + 2]:
            if op not in known:
                raise ValueError(f"unknown op {op!r} in {field}; expected one of {sorted(known)}")
            if not 0 <= src < node:
                raise ValueError(f"{field}: node {node} takes input {src}; inputs must be earlier "
                                 f"nodes 0..{node - 1}")
    last = len(gene) // 2 + 1
    for n in concat:
        if not 2 <= n <= last:  # nodes 0 and 1 are the cell's inputs, not its results
            raise ValueError(f"{field}_concat names node {n}; the cell's intermediate nodes are 2..{last}")
    if len(set(concat)) != len(concat):
        raise ValueError(f"{field}_concat names a node twice: {list(concat)}")


def _parse_concat(node: ast.expr) -> "list[int] | range":
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range"
            and not node.keywords):
        return range(*[ast.literal_eval(a) for a in node.args])  # lazy: `_concat` bounds its length
    return ast.literal_eval(node)


class DartsSpace(CellSpace):
    name = "darts"
    ops = PRIMITIVES
    cell_types = ("normal", "reduce")
    num_input_nodes = 2
    num_nodes = 4
    pool_batchnorm = True
    inputs_per_node = 2
    stem_multiplier = 3
    preprocess_inputs = True
    final_activation = False
    training_extras = True

    # --- network skeleton -----------------------------------------------------------------------
    @property
    def output_nodes(self) -> tuple[int, ...]:
        """Every intermediate node: DARTS concatenates them."""
        return tuple(self.intermediate_nodes)

    def blocks(self, C: int, layers: int) -> list[Block]:
        """`layers` cells; those at 1/3 and 2/3 of the depth reduce and double the channels."""
        out = []
        for i in range(layers):
            reduction = i in self.reduction_positions(layers)
            C = 2 * C if reduction else C
            out.append(Block("cell", C, reduction))
        return out

    @property
    def node_labels(self) -> list[str]:
        """The two previous cells' outputs, then intermediate nodes 0..n-1 (as the DARTS paper draws them)."""
        return ["c_{k-2}", "c_{k-1}"] + [str(i) for i in range(self.num_nodes)]

    @staticmethod
    def reduction_positions(layers: int) -> tuple[int, int]:
        """Indices of the reduction cells among `layers` cells."""
        return layers // 3, 2 * layers // 3

    # --- string form --------------------------------------------------------------------------
    def parse(self, text: str) -> Genotype:
        """Parses `Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...)`."""
        if isinstance(text, Genotype):
            return text
        if not isinstance(text, str):
            raise ValueError(f"malformed genotype: expected a string, got {type(text).__name__}")
        try:
            call = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as err:
            raise ValueError(f"malformed genotype {text!r}: {err.msg}") from None
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "Genotype"):
            raise ValueError(f"malformed genotype {text!r}: expected 'Genotype(normal=[...], normal_concat=[...], "
                             f"reduce=[...], reduce_concat=[...])'")
        fields = list(Genotype._fields)
        values: dict[str, Any] = {}
        try:
            for name, arg in zip(fields, call.args):
                values[name] = arg
            for kw in call.keywords:
                if kw.arg not in fields or kw.arg in values:
                    raise ValueError(f"malformed genotype {text!r}: unexpected field {kw.arg!r}")
                values[kw.arg] = kw.value
            missing = [f for f in fields if f not in values]
            if missing or len(call.args) > len(fields):
                raise ValueError(f"malformed genotype {text!r}: missing fields {missing}")
            parsed = {k: (_parse_concat(v) if k.endswith("concat") else ast.literal_eval(v))
                      for k, v in values.items()}
        except (ValueError, TypeError, SyntaxError) as err:
            if isinstance(err, ValueError) and str(err).startswith("malformed genotype"):
                raise
            raise ValueError(f"malformed genotype {text!r}: fields must be literal lists") from None
        genotype = Genotype(**parsed)
        for cell_type in self.cell_types:
            check_cell(getattr(genotype, cell_type), getattr(genotype, cell_type + "_concat"), cell_type,
                       _all_darts_ops())
        return genotype

    def format(self, genotype: Genotype) -> str:
        return repr(genotype)

    # --- fit to the supernet --------------------------------------------------------------------
    def validate(self, genotype: Any) -> Genotype:
        if isinstance(genotype, str):
            genotype = self.parse(genotype)
        if not isinstance(genotype, tuple) or len(genotype) != 4:
            raise ValueError(f"expected a DARTS Genotype, got {genotype!r}")
        genotype = Genotype(*genotype)
        for cell_type in self.cell_types:
            gene = getattr(genotype, cell_type)
            concat = getattr(genotype, cell_type + "_concat")
            check_cell(gene, concat, cell_type, _all_darts_ops())
            if len(gene) != 2 * self.num_nodes:
                raise ValueError(f"genotype does not fit the darts space: {cell_type} has {len(gene) // 2} nodes; "
                                 f"expected {self.num_nodes}")
            for op, _ in gene:
                if op not in self.ops:
                    raise ValueError(f"genotype does not fit the darts space: op {op!r} in {cell_type} is not "
                                     f"one of {list(self.ops)}")
            for i in range(self.num_nodes):
                srcs = [src for _, src in gene[2 * i: 2 * i + 2]]
                if srcs[0] == srcs[1]:
                    raise ValueError(f"genotype does not fit the darts space: node {i + 2} of {cell_type} "
                                     f"takes input {srcs[0]} twice; expected two distinct inputs")
        return genotype

    def validate_fixed(self, genotype: Any) -> Genotype:
        """Any DARTS-family genotype (NASNet, AmoebaNet: more nodes and 7x7 ops than the search space)."""
        if isinstance(genotype, str):
            return self.parse(genotype)
        if not isinstance(genotype, tuple) or len(genotype) != 4:
            raise ValueError(f"expected a DARTS Genotype, got {genotype!r}")
        genotype = Genotype(*genotype)
        for cell_type in self.cell_types:
            check_cell(getattr(genotype, cell_type), getattr(genotype, cell_type + "_concat"), cell_type,
                       _all_darts_ops())
        return genotype

    # --- derivation -----------------------------------------------------------------------------
    def derive(self, weights: Mapping[str, torch.Tensor]) -> Genotype:
        """DARTS's rule: per node, the two inputs whose strongest non-`none` op is strongest."""
        self.check_weights(weights)
        none = self.ops.index("none")
        genes = {}
        for cell_type in self.cell_types:
            W = weights[cell_type].detach().float().cpu()
            W = torch.cat([W[:, :none], torch.full_like(W[:, :1], -float("inf")), W[:, none + 1:]], dim=1)
            gene = []
            for node in range(2, 2 + self.num_nodes):
                rows = W[self.node_edges(node)]
                best_op = rows.argmax(dim=1)  # first maximum, as DARTS's strict '>' scan
                best_value = rows.gather(1, best_op[:, None])[:, 0]
                # Stable sort by strength, as DARTS's `sorted(..., key=-max)` keeps ties in input order.
                order = sorted(range(node), key=lambda src: -best_value[src].item())[:2]
                gene += [(self.ops[int(best_op[src])], src) for src in order]
            genes[cell_type] = gene
        concat = list(range(2, 2 + self.num_nodes))
        return Genotype(genes["normal"], concat, genes["reduce"], concat)

    # --- paths ----------------------------------------------------------------------------------
    def to_paths(self, genotype: Any) -> Paths:
        genotype = self.validate(genotype)
        paths: Paths = {}
        for cell_type in self.cell_types:
            path: list[int | None] = [None] * self.num_edges
            for i, (op, src) in enumerate(getattr(genotype, cell_type)):
                path[self.edge_index[(i // 2 + 2, src)]] = self.op_index(op)
            paths[cell_type] = tuple(path)
        return paths

    def from_paths(self, paths: Mapping[str, Sequence[int | None]]) -> Genotype:
        genes = {}
        for cell_type in self.cell_types:
            path = paths[cell_type]
            if len(path) != self.num_edges:
                raise ValueError(f"path for {cell_type!r} has {len(path)} edges; expected {self.num_edges}")
            genes[cell_type] = [(self.ops[path[e]], self.edges[e][1])
                                for node in range(2, 2 + self.num_nodes) for e in self.node_edges(node)
                                if path[e] is not None]
        concat = list(range(2, 2 + self.num_nodes))
        return self.validate(Genotype(genes["normal"], concat, genes["reduce"], concat))

    # --- sampling -------------------------------------------------------------------------------
    def random_genotype(self, rng: random.Random) -> Genotype:
        """Two distinct inputs per node and a non-`none` op on each, uniformly (as RSPS samples)."""
        ops = [op for op in self.ops if op != "none"]
        genes = {}
        for cell_type in self.cell_types:
            gene = []
            for node in range(2, 2 + self.num_nodes):
                for src in sorted(rng.sample(range(node), 2)):
                    gene.append((rng.choice(ops), src))
            genes[cell_type] = gene
        concat = list(range(2, 2 + self.num_nodes))
        return Genotype(genes["normal"], concat, genes["reduce"], concat)

    def mutate(self, genotype: Any, rng: random.Random) -> Genotype:
        """Changes one op, or moves one edge to another input of the same node."""
        genotype = self.validate(genotype)
        cell_type = rng.choice(self.cell_types)
        gene = list(getattr(genotype, cell_type))
        k = rng.randrange(len(gene))
        op, src = gene[k]
        node = k // 2 + 2
        other_src = gene[k ^ 1][1]
        free_inputs = [s for s in range(node) if s not in (src, other_src)]
        if free_inputs and rng.random() < 0.5:
            gene[k] = (op, rng.choice(free_inputs))
        else:
            gene[k] = (rng.choice([o for o in self.ops if o not in ("none", op)]), src)
        fields = genotype._asdict()
        fields[cell_type] = gene
        return Genotype(**fields)


def _all_darts_ops() -> list[str]:
    # Evaluation networks accept every DARTS-family op (NASNet and AmoebaNet use 7x7 ops).
    return list(PRIMITIVES) + ["sep_conv_7x7", "conv_7x1_1x7"]


NASNet = Genotype(
    normal=[("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 0), ("sep_conv_3x3", 0),
            ("avg_pool_3x3", 1), ("skip_connect", 0), ("avg_pool_3x3", 0), ("avg_pool_3x3", 0),
            ("sep_conv_3x3", 1), ("skip_connect", 1)],
    normal_concat=[2, 3, 4, 5, 6],
    reduce=[("sep_conv_5x5", 1), ("sep_conv_7x7", 0), ("max_pool_3x3", 1), ("sep_conv_7x7", 0),
            ("avg_pool_3x3", 1), ("sep_conv_5x5", 0), ("skip_connect", 3), ("avg_pool_3x3", 2),
            ("sep_conv_3x3", 2), ("max_pool_3x3", 1)],
    reduce_concat=[4, 5, 6],
)

AmoebaNet = Genotype(
    normal=[("avg_pool_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("avg_pool_3x3", 3), ("sep_conv_3x3", 1), ("skip_connect", 1),
            ("skip_connect", 0), ("avg_pool_3x3", 1)],
    normal_concat=[4, 5, 6],
    reduce=[("avg_pool_3x3", 0), ("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("sep_conv_7x7", 2),
            ("sep_conv_7x7", 0), ("avg_pool_3x3", 1), ("max_pool_3x3", 0), ("max_pool_3x3", 1),
            ("conv_7x1_1x7", 0), ("sep_conv_3x3", 5)],
    reduce_concat=[3, 4, 6],
)

DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=[2, 3, 4, 5],
)

DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5],
)

GENOTYPES = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2, "NASNet": NASNet,
             "AmoebaNet": AmoebaNet}
