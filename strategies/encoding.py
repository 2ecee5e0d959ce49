"""A cell space as a sequence of categorical decisions, for the REINFORCE controller.

Built only from the space API (`cell_types`, `edges`, `ops`, `to_paths`, `from_paths`). Per cell type and
intermediate node, in order:
- spaces where every node uses all its inputs (NAS-Bench-201): one op decision per incoming edge;
- spaces where a node picks `inputs_per_node` of its inputs (DARTS): for each picked input, an input
  decision (ascending, so each genotype has one encoding) followed by its op decision. Picked edges
  never carry `none`, as DARTS derivation and random sampling do.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from supernet.spaces import CellSpace, get_space


@dataclass(frozen=True)
class Decision:
    """One categorical choice: an input (a node index) or an op (an index into `space.ops`)."""

    kind: str  # "input" or "op"
    cell_type: str
    node: int
    slot: int  # which incoming edge of the node (op decisions of all-input nodes: the input itself)
    size: int  # number of raw choices; `valid` narrows them given the earlier decisions


class DecisionSpace:
    """Genotype <-> tuple of choices, and the choices allowed at each step."""

    def __init__(self, space: "str | CellSpace") -> None:
        self.space = get_space(space)
        space = self.space
        self.inputs_per_node = space.inputs_per_node
        none = space.ops.index("none") if "none" in space.ops else None
        self.all_ops = tuple(range(len(space.ops)))
        self.real_ops = tuple(k for k in self.all_ops if k != none)
        decisions = []
        for ct in space.cell_types:
            for node in range(space.num_input_nodes, space.num_input_nodes + space.num_nodes):
                if self.inputs_per_node is None:
                    decisions += [Decision("op", ct, node, src, len(space.ops)) for src in range(node)]
                else:
                    for slot in range(min(self.inputs_per_node, node)):
                        decisions.append(Decision("input", ct, node, slot, node))
                        decisions.append(Decision("op", ct, node, slot, len(space.ops)))
        self.decisions: tuple[Decision, ...] = tuple(decisions)

    def __len__(self) -> int:
        return len(self.decisions)

    def valid(self, prefix: Sequence[int]) -> tuple[int, ...]:
        """The choices allowed for decision `len(prefix)` after the choices in `prefix`."""
        t = len(prefix)
        if t >= len(self.decisions):
            raise ValueError(f"prefix has {t} choices; the space has only {len(self.decisions)} decisions")
        d = self.decisions[t]
        if d.kind == "op":
            return self.all_ops if self.inputs_per_node is None else self.real_ops
        picks = min(self.inputs_per_node, d.node)
        # Ascending inputs, leaving room for the inputs still to pick.
        lowest = prefix[t - 2] + 1 if d.slot > 0 else 0
        return tuple(range(lowest, d.node - (picks - 1 - d.slot)))

    def choices(self) -> Iterator[tuple[int, ...]]:
        """Every full sequence of choices, depth first (lazily: a large space yields without end in sight)."""

        def extend(prefix: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
            if len(prefix) == len(self.decisions):
                yield prefix
                return
            for c in self.valid(prefix):
                yield from extend(prefix + (c,))

        return extend(())

    def all_genotypes(self, limit: int) -> list[Any] | None:
        """Every genotype of the space, in a fixed order, or None when there are more than `limit`."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
        every = list(itertools.islice(self.choices(), limit + 1))  # counted before decoding: decode is slower
        return None if len(every) > limit else [self.decode(c) for c in every]

    def decode(self, choices: Sequence[int]) -> Any:
        """The genotype a full sequence of choices describes."""
        if len(choices) != len(self.decisions):
            raise ValueError(f"expected {len(self.decisions)} choices, got {len(choices)}")
        paths = {ct: [None] * self.space.num_edges for ct in self.space.cell_types}
        src = None
        for d, c in zip(self.decisions, choices):
            if d.kind == "input":
                src = c
            else:
                edge = (d.node, d.slot if self.inputs_per_node is None else src)
                paths[d.cell_type][self.space.edge_index[edge]] = c
        return self.space.from_paths(paths)

    def encode(self, genotype: Any) -> tuple[int, ...]:
        """The choices that decode to `genotype`."""
        paths = self.space.to_paths(genotype)
        choices: list[int] = []
        for ct in self.space.cell_types:
            path = paths[ct]
            for node in range(self.space.num_input_nodes, self.space.num_input_nodes + self.space.num_nodes):
                used = [(self.space.edges[e][1], path[e]) for e in self.space.node_edges(node) if path[e] is not None]
                if self.inputs_per_node is None:
                    choices += [k for _, k in used]
                else:
                    for src, k in used:
                        choices += [src, k]
        if len(choices) != len(self.decisions):
            raise ValueError(f"genotype {genotype!r} does not fit the decision structure of space {self.space.name!r}")
        return tuple(choices)
