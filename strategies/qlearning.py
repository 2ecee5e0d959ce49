"""Q-learning over the construction of an architecture (MetaQNN-style), epsilon-greedy, with replay.

An episode builds one architecture decision by decision (`encoding.DecisionSpace`): each action adds
the next edge's input or op. The state after step t is (t, the last choice): the position says which
edge of which node is being built, the choice its op type or connection, as MetaQNN's state names the
layer just added. Only the finished architecture is rewarded (intermediate rewards are 0), and
    Q(s, a) <- Q(s, a) + alpha * (r + gamma * max_a' Q(s', a') - Q(s, a)),
with max_a' Q = 0 at the terminal state. After each told reward, `replay` stored episodes (the newest
always among them) are replayed, each from its last transition back to its first. As in MetaQNN, an
episode that rebuilds an architecture already evaluated learns from its stored reward instead of
spending budget, and the agent builds again (up to `MAX_REBUILDS` times).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from .base import STRATEGIES, Strategy
from .encoding import DecisionSpace

State = Hashable
MAX_REBUILDS = 100


@dataclass(frozen=True)
class Transition:
    state: State
    action: int
    next_state: State | None  # None: the architecture is complete
    next_actions: tuple[int, ...]  # actions allowed in next_state


@STRATEGIES.register("qlearning")
class QLearning(Strategy):
    """Tabular Q-learning; epsilon decays linearly from `epsilon_start` to `epsilon_end` over the first
    `explore_fraction` of the budget."""

    name = "qlearning"

    def __init__(self, space, budget: int, seed: int = 0, alpha: float = 0.5, gamma: float = 1.0,
                 epsilon_start: float = 1.0, epsilon_end: float = 0.1, explore_fraction: float = 0.5,
                 replay: int = 20, q_init: float = 0.0) -> None:
        super().__init__(space, budget, seed)
        for key, value in (("alpha", alpha), ("gamma", gamma), ("epsilon_start", epsilon_start),
                           ("epsilon_end", epsilon_end), ("explore_fraction", explore_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {value!r}")
        if isinstance(replay, bool) or not isinstance(replay, int) or replay < 1:
            raise ValueError(f"replay must be a positive number of episodes, got {replay!r}")
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.epsilon_start, self.epsilon_end, self.explore_fraction = epsilon_start, epsilon_end, explore_fraction
        self.replay_size, self.q_init = replay, float(q_init)
        self.decisions = DecisionSpace(self.space)
        self.q: dict[tuple[State, int], float] = {}
        self.memory: list[tuple[tuple[Transition, ...], float]] = []  # (episode, reward)
        self._episode: tuple[Transition, ...] | None = None

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "gamma": self.gamma, "epsilon_start": self.epsilon_start,
                "epsilon_end": self.epsilon_end, "explore_fraction": self.explore_fraction,
                "replay": self.replay_size, "q_init": self.q_init}

    @staticmethod
    def state_of(choices: Sequence[int]) -> State:
        """The state after `choices`: the next position and the last choice."""
        return (len(choices), choices[-1] if choices else None)

    def value(self, state: State, action: int) -> float:
        return self.q.get((state, action), self.q_init)

    def epsilon(self) -> float:
        horizon = max(1.0, self.explore_fraction * self.budget)
        progress = min(1.0, len(self.history) / horizon)
        return self.epsilon_start + (self.epsilon_end - self.epsilon_start) * progress

    def update(self, state: State, action: int, reward: float, next_state: State | None,
               next_actions: Sequence[int]) -> float:
        """One Q-learning step on (s, a, r, s'); returns the new Q(s, a)."""
        future = 0.0 if next_state is None else max(self.value(next_state, a) for a in next_actions)
        old = self.value(state, action)
        new = old + self.alpha * (reward + self.gamma * future - old)
        self.q[(state, action)] = new
        return new

    def _propose(self) -> Any:
        rewards = {t.arch: t.reward for t in self.history}
        for attempt in range(MAX_REBUILDS):
            genotype = self._build()
            arch = self.space.format(genotype)
            if arch not in rewards or attempt == MAX_REBUILDS - 1:  # new, or the space looks exhausted
                return genotype
            self._learn(rewards[arch])

    def _build(self) -> Any:
        """One epsilon-greedy episode; its transitions wait in `_episode` for the reward."""
        epsilon = self.epsilon()
        choices: list[int] = []
        transitions: list[Transition] = []
        for _ in range(len(self.decisions)):
            state = self.state_of(choices)
            valid = self.decisions.valid(choices)
            if self.rng.random() < epsilon:
                action = self.rng.choice(valid)
            else:  # greedy, ties broken at random so untried actions are not ordered by index
                best = max(self.value(state, a) for a in valid)
                action = self.rng.choice([a for a in valid if self.value(state, a) == best])
            choices.append(action)
            transitions.append(Transition(state, action, None, ()))
        # Link each transition to its successor now that the episode is complete.
        linked = [Transition(tr.state, tr.action, self.state_of(choices[:t + 1]), self.decisions.valid(choices[:t + 1]))
                  for t, tr in enumerate(transitions[:-1])]
        self._episode = tuple(linked + [transitions[-1]])
        return self.decisions.decode(choices)

    def _observe(self, genotype: Any, reward: float) -> None:
        self._learn(reward)

    def _learn(self, reward: float) -> None:
        """Stores the pending episode with its reward and replays stored episodes."""
        self.memory.append((self._episode, reward))
        self._episode = None
        replayed = [self.memory[-1]] + [self.rng.choice(self.memory) for _ in range(self.replay_size - 1)]
        for episode, episode_reward in replayed:
            for t in reversed(range(len(episode))):
                tr = episode[t]
                r = episode_reward if tr.next_state is None else 0.0
                self.update(tr.state, tr.action, r, tr.next_state, tr.next_actions)
