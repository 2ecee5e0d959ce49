"""What every cell-based search space declares: its ops, cell shape, network skeleton and rules."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# One cell's choice: per edge (in alpha-row order), the index of the chosen op, or None for an
# edge the architecture does not use.
Path = tuple[int | None, ...]
Paths = dict[str, Path]


@dataclass(frozen=True)
class Block:
    """One position of a network's body: a cell, or a fixed residual block that halves the resolution."""

    kind: str  # "cell" or "residual"
    channels: int  # the cell's C (channels per node), or the residual block's output channels
    reduction: bool  # whether it halves the spatial resolution


class CellSpace(ABC):
    """A cell-based space: cells are DAGs whose intermediate nodes sum ops applied to earlier nodes.

    Nodes are numbered with the cell's input nodes first. `edges` lists every (node, input) pair
    of the supernet cell in alpha-row order: node-major, then by input.
    """

    name: str
    ops: tuple[str, ...]
    cell_types: tuple[str, ...]
    num_input_nodes: int
    num_nodes: int  # intermediate nodes
    inputs_per_node: int | None = None  # the inputs a derived node keeps (DARTS: 2); None: every edge stays
    pool_batchnorm: bool  # search networks append a non-affine BN to pools
    # The network skeleton around the cells:
    stem_multiplier: int  # the stem outputs stem_multiplier * C channels
    preprocess_inputs: bool  # each cell input passes a 1x1 ReLU-conv-BN (or factorized reduce) first
    final_activation: bool  # a BN and ReLU between the last block and the global pooling
    training_extras: bool  # stand-alone networks offer DARTS's auxiliary head, drop path and ImageNet stem

    def __init__(self) -> None:
        self.edges: tuple[tuple[int, int], ...] = tuple(
            (node, src)
            for node in range(self.num_input_nodes, self.num_input_nodes + self.num_nodes)
            for src in range(node)
        )
        self.edge_index = {edge: e for e, edge in enumerate(self.edges)}

    @property
    def num_edges(self) -> int:
        return len(self.edges)

    @property
    def intermediate_nodes(self) -> range:
        """The nodes a cell computes (after its input nodes)."""
        return range(self.num_input_nodes, self.num_input_nodes + self.num_nodes)

    @property
    @abstractmethod
    def output_nodes(self) -> tuple[int, ...]:
        """The nodes whose states, concatenated on channels, form a cell's output."""

    @abstractmethod
    def blocks(self, C: int, layers: int) -> list[Block]:
        """The network body in order: cells and residual blocks with their channels."""

    def cell_type(self, reduction: bool) -> str:
        """The cell type (alpha set) of a reduction or a normal cell."""
        return self.cell_types[-1] if reduction else self.cell_types[0]

    @property
    def node_labels(self) -> list[str]:
        """How plots name the cell's nodes, input nodes first (by default their indices)."""
        return [str(n) for n in range(self.num_input_nodes + self.num_nodes)]

    def cell_output(self, states: Sequence[Any]) -> Any:
        """A cell's output from all its node states."""
        outputs = [states[n] for n in self.output_nodes]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def op_index(self, name: str) -> int:
        if name not in self.ops:
            raise ValueError(f"unknown op {name!r} for space {self.name!r}; expected one of {list(self.ops)}")
        return self.ops.index(name)

    def node_edges(self, node: int) -> range:
        """Rows of the alpha matrix that feed `node`."""
        first = self.edge_index[(node, 0)]
        return range(first, first + node)

    @abstractmethod
    def parse(self, text: str) -> Any:
        """Genotype from its published string form."""

    @abstractmethod
    def format(self, genotype: Any) -> str:
        """The published string form of a genotype."""

    @abstractmethod
    def validate(self, genotype: Any) -> Any:
        """The genotype if it fits this search space, else ValueError naming the problem."""

    def validate_fixed(self, genotype: Any) -> Any:
        """The genotype if a stand-alone network can be built from it (by default: if it fits the space)."""
        return self.validate(genotype)

    @abstractmethod
    def derive(self, weights: Mapping[str, torch.Tensor]) -> Any:
        """Genotype from per-cell-type edge-op strengths (rows: edges, columns: ops)."""

    @abstractmethod
    def to_paths(self, genotype: Any) -> Paths:
        """Per cell type, the op index each edge runs (None: edge unused)."""

    @abstractmethod
    def from_paths(self, paths: Mapping[str, Sequence[int | None]]) -> Any:
        """Inverse of `to_paths`."""

    def signature(self, genotype: Any) -> Hashable:
        """A key that genotypes building the same cells share: by default their edge form (per cell type, the
        op of each edge), so the order a genotype lists a node's inputs in does not matter. Spaces that
        know more equivalences (NAS-Bench-201's unused edges and identity ops) override it."""
        paths = self.to_paths(genotype)
        return tuple(paths[cell_type] for cell_type in self.cell_types)

    @abstractmethod
    def random_genotype(self, rng: random.Random) -> Any:
        """A uniformly drawn genotype, as random search and single-path training sample them."""

    @abstractmethod
    def mutate(self, genotype: Any, rng: random.Random) -> Any:
        """A different genotype that changes one op or one input edge."""

    def check_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        expected = (self.num_edges, len(self.ops))
        for cell_type in self.cell_types:
            if cell_type not in weights:
                raise ValueError(f"missing weights for cell type {cell_type!r}")
            if tuple(weights[cell_type].shape) != expected:
                raise ValueError(f"weights for {cell_type!r} have shape {tuple(weights[cell_type].shape)}; "
                                 f"expected {expected}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, ops={list(self.ops)})"
