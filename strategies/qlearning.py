"""Q-learning over edits of an architecture, epsilon-greedy, with experience replay.

State: the architecture edited so far, as its per-cell-type edge encoding (`space.to_paths`): for each
edge of each cell, the op it runs or None when the cell does not use that edge. It names every layer
(edge), its op type and its connection (the edge's input node).

Actions (`Edit`) change one part of the state:
- change the op of one edge. In spaces where every edge is present (NAS-Bench-201), setting an edge
  to `none` removes it and setting a `none` edge to another op adds it back;
- in spaces where a node picks `inputs_per_node` inputs (DARTS), move one of a node's input edges to
  another input: the edge is removed and one from the new input, with the same op, is added. Picked
  edges never carry `none`, as DARTS derivation and random sampling do.

An episode starts from the best architecture found so far (the first one, and any after every edit
within reach proved already evaluated, from a random architecture) and applies up to `episode_length`
edits. Each edit leads to an architecture that is evaluated (one unit of budget) unless its reward is
already known, in which case the stored reward is reused and the agent edits on without spending
budget. The reward of an edit is the change in the evaluated reward it causes, so an untried edit
(Q = `q_init` = 0) ranks above edits known to make things worse, and
    Q(s, a) <- Q(s, a) + alpha * (r + gamma * max_a' Q(s', a') - Q(s, a)).
Episodes are cut off rather than ended, so every update bootstraps from s'. Each distinct transition
is stored once (edits are deterministic); after each told reward the newest transition and
`replay - 1` stored ones drawn at random are replayed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from supernet import checks
from supernet.spaces.base import Path

from .base import STRATEGIES, Strategy

State = tuple[Path, ...]  # one path per cell type, in `space.cell_types` order
MAX_FREE_STEPS = 200  # edits through already-evaluated architectures per ask before jumping at random


class Edit(NamedTuple):
    """Puts op index `op` on edge `to_edge` of a cell type in place of edge `edge` (the same edge: an op change)."""

    cell_type: str
    edge: int
    to_edge: int
    op: int


@dataclass(frozen=True)
class Transition:
    state: State
    action: Edit
    reward: float  # reward of next_state minus reward of state
    next_state: State


@STRATEGIES.register("qlearning")
class QLearning(Strategy):
    """Tabular Q-learning over architecture edits; epsilon decays linearly from `epsilon_start` to
    `epsilon_end` over the first `explore_fraction` of the budget."""

    name = "qlearning"

    def __init__(self, space, budget: int, seed: int = 0, alpha: float = 0.5, gamma: float = 0.9,
                 epsilon_start: float = 0.5, epsilon_end: float = 0.1, explore_fraction: float = 0.5,
                 replay: int = 20, q_init: float = 0.0, episode_length: int = 5) -> None:
        super().__init__(space, budget, seed)
        for key, value in (("alpha", alpha), ("gamma", gamma), ("epsilon_start", epsilon_start),
                           ("epsilon_end", epsilon_end), ("explore_fraction", explore_fraction)):
            checks.number(key, value, non_negative=True, maximum=1.0)
        checks.integer("replay", replay)
        checks.integer("episode_length", episode_length)
        checks.number("q_init", q_init)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.epsilon_start, self.epsilon_end, self.explore_fraction = epsilon_start, epsilon_end, explore_fraction
        self.replay_size, self.q_init, self.episode_length = replay, float(q_init), episode_length
        # Picked edges (DARTS) never carry `none`; where every edge is present, `none` removes one.
        picks_inputs = self.space.inputs_per_node is not None
        self.edge_ops = tuple(k for k, op in enumerate(self.space.ops) if not (picks_inputs and op == "none"))
        self.q: dict[tuple[Hashable, Hashable], float] = {}
        self.memory: list[Transition] = []
        self._stored: set[tuple[State, Edit]] = set()
        self._rewards: dict[State, float] = {}  # every evaluated architecture's reward
        self._best: State | None = None
        self._actions: dict[State, tuple[Edit, ...]] = {}
        self._state: State | None = None  # where the episode stands
        self._steps = 0  # edits made in this episode
        self._step: tuple[State, Edit] | None = None  # the edit whose result awaits its reward

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "gamma": self.gamma, "epsilon_start": self.epsilon_start,
                "epsilon_end": self.epsilon_end, "explore_fraction": self.explore_fraction,
                "replay": self.replay_size, "q_init": self.q_init, "episode_length": self.episode_length}

    # --- states and actions ---------------------------------------------------------------------
    def state_of(self, genotype: Any) -> State:
        """The state describing `genotype`: its per-cell-type edge encoding."""
        paths = self.space.to_paths(genotype)
        return tuple(paths[ct] for ct in self.space.cell_types)

    def genotype_of(self, state: State) -> Any:
        return self.space.from_paths(dict(zip(self.space.cell_types, state)))

    def actions(self, state: State) -> tuple[Edit, ...]:
        """Every edit allowed in `state`: another op on a present edge, or a node's edge moved to a free input."""
        if state not in self._actions:
            edits = []
            for ct, path in zip(self.space.cell_types, state):
                for e, k in enumerate(path):
                    if k is None:
                        continue
                    edits += [Edit(ct, e, e, op) for op in self.edge_ops if op != k]
                    node = self.space.edges[e][0]
                    edits += [Edit(ct, e, f, k) for f in self.space.node_edges(node) if path[f] is None]
            self._actions[state] = tuple(edits)
        return self._actions[state]

    def apply(self, state: State, edit: Edit) -> State:
        """The state after `edit`."""
        i = self.space.cell_types.index(edit.cell_type)
        path = list(state[i])
        path[edit.edge] = None
        path[edit.to_edge] = edit.op
        return state[:i] + (tuple(path),) + state[i + 1:]

    # --- learning -------------------------------------------------------------------------------
    def value(self, state: Hashable, action: Hashable) -> float:
        return self.q.get((state, action), self.q_init)

    def epsilon(self) -> float:
        horizon = max(1.0, self.explore_fraction * self.budget)
        progress = min(1.0, len(self.history) / horizon)
        return self.epsilon_start + (self.epsilon_end - self.epsilon_start) * progress

    def update(self, state: Hashable, action: Hashable, reward: float, next_state: Hashable | None,
               next_actions: Sequence[Hashable]) -> float:
        """One Q-learning step on (s, a, r, s'); returns the new Q(s, a). `next_state` None: terminal."""
        future = 0.0 if next_state is None else max(self.value(next_state, a) for a in next_actions)
        old = self.value(state, action)
        new = old + self.alpha * (reward + self.gamma * future - old)
        self.q[(state, action)] = new
        return new

    def _learn(self, transition: Transition) -> None:
        """Stores a transition (once) and updates its Q-value."""
        key = (transition.state, transition.action)
        if key not in self._stored:
            self._stored.add(key)
            self.memory.append(transition)
        self.update(transition.state, transition.action, transition.reward, transition.next_state,
                    self.actions(transition.next_state))

    # --- ask / tell -----------------------------------------------------------------------------
    def _choose(self, state: State) -> Edit:
        valid = self.actions(state)
        if self.rng.random() < self.epsilon():
            return self.rng.choice(valid)
        # Greedy, ties broken at random so untried edits are not ordered by index.
        values = [self.value(state, a) for a in valid]
        best = max(values)
        return self.rng.choice([a for a, v in zip(valid, values) if v == best])

    def _propose(self) -> Any:
        for _ in range(MAX_FREE_STEPS):
            if self._state is None or self._steps >= self.episode_length:
                self._steps = 0
                if self._best is None:  # the first episode starts from a random architecture
                    self._state = self.state_of(self.space.random_genotype(self.rng))
                    return self.genotype_of(self._state)
                self._state = self._best
            state = self._state
            action = self._choose(state)
            self._state = self.apply(state, action)
            self._steps += 1
            if self._state not in self._rewards:
                self._step = (state, action)
                return self.genotype_of(self._state)
            self._learn(Transition(state, action, self._rewards[self._state] - self._rewards[state], self._state))
        # Every edit within reach was evaluated already: a new episode starts from a random architecture,
        # one not yet evaluated if a few draws find one (else the space looks exhausted).
        for _ in range(MAX_FREE_STEPS):
            self._state, self._steps = self.state_of(self.space.random_genotype(self.rng)), 0
            if self._state not in self._rewards:
                break
        return self.genotype_of(self._state)

    def _observe(self, genotype: Any, reward: float) -> None:
        state = self.state_of(genotype)
        self._rewards.setdefault(state, reward)
        if self._best is None or reward > self._rewards[self._best]:
            self._best = state
        if self._step is None:
            return
        previous, action = self._step
        self._step = None
        self._learn(Transition(previous, action, reward - self._rewards[previous], state))
        replayed = [self.rng.choice(self.memory) for _ in range(self.replay_size - 1)]
        for transition in replayed:
            self.update(transition.state, transition.action, transition.reward, transition.next_state,
                        self.actions(transition.next_state))
