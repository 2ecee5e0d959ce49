"""REINFORCE with an LSTM controller, a moving-average baseline and an entropy bonus (ENAS, NAS-Bench-201)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from supernet import checks

from .base import STRATEGIES, Strategy
from .encoding import DecisionSpace


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Runs the tiny controller on one thread: on 2 busy cores, 2 threads made a step 4-8x slower
    (nb201: 55 vs 7 ms; darts: 109 vs 23 ms, measured with tests' torch.set_num_threads(2))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Controller(nn.Module):
    """An LSTM that emits the space's decisions in order, each conditioned on the previous choice."""

    def __init__(self, decisions: DecisionSpace, hidden: int = 32) -> None:
        super().__init__()
        self.decisions = decisions
        sizes = [d.size for d in decisions.decisions]
        # Token 0 starts the sequence; choice c of decision t is token offsets[t] + c.
        self.offsets = [1 + sum(sizes[:t]) for t in range(len(sizes))]
        self.embedding = nn.Embedding(1 + sum(sizes), hidden)
        self.lstm = nn.LSTMCell(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, size) for size in sizes)

    def sample(self, generator: torch.Generator) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
        """Choices, the sum of their log-probabilities and the sum of the policies' entropies."""
        token = torch.zeros(1, dtype=torch.long)
        state: tuple[torch.Tensor, torch.Tensor] | None = None
        choices: list[int] = []
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        for t, head in enumerate(self.heads):
            h, c = self.lstm(self.embedding(token), state)
            state = (h, c)
            logits = head(h)[0]
            valid = self.decisions.valid(choices)
            if len(valid) < logits.numel():
                mask = torch.full_like(logits, -float("inf"))
                mask[list(valid)] = 0.0
                logits = logits + mask
            log_p = torch.log_softmax(logits, dim=-1)
            choice = int(torch.multinomial(log_p.exp(), 1, generator=generator))
            log_prob = log_prob + log_p[choice]
            entropy = entropy - (log_p.exp()[list(valid)] * log_p[list(valid)]).sum()
            choices.append(choice)
            token = torch.tensor([self.offsets[t] + choice])
        return tuple(choices), log_prob, entropy


@STRATEGIES.register("reinforce")
class Reinforce(Strategy):
    """Policy gradient: loss = -(reward - baseline) * log p(arch) - entropy_weight * entropy.

    The baseline is an exponential moving average of rewards (updated before the advantage is taken,
    as NAS-Bench-201's REINFORCE does); Adam updates the controller after every told reward.
    """

    name = "reinforce"

    def __init__(self, space, budget: int, seed: int = 0, lr: float = 0.005, hidden: int = 32,
                 baseline_decay: float = 0.9, entropy_weight: float = 1e-3) -> None:
        super().__init__(space, budget, seed)
        checks.number("lr", lr, positive=True)
        checks.fraction("baseline_decay", baseline_decay)
        checks.number("entropy_weight", entropy_weight, non_negative=True)
        checks.integer("hidden", hidden)
        self.lr, self.hidden, self.baseline_decay, self.entropy_weight = lr, hidden, baseline_decay, entropy_weight
        self.decisions = DecisionSpace(self.space)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global generator
            torch.manual_seed(seed)
            self.controller = Controller(self.decisions, hidden)
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.controller.parameters(), lr=lr)
        self.baseline: float | None = None
        self._sample: tuple[torch.Tensor, torch.Tensor] | None = None

    def config(self) -> dict[str, Any]:
        return {"lr": self.lr, "hidden": self.hidden, "baseline_decay": self.baseline_decay,
                "entropy_weight": self.entropy_weight}

    def _propose(self) -> Any:
        with one_thread():
            choices, log_prob, entropy = self.controller.sample(self.generator)
        self._sample = (log_prob, entropy)
        return self.decisions.decode(choices)

    def _observe(self, genotype: Any, reward: float) -> None:
        log_prob, entropy = self._sample
        self._sample = None
        d = self.baseline_decay
        self.baseline = reward if self.baseline is None else d * self.baseline + (1 - d) * reward
        loss = -(reward - self.baseline) * log_prob - self.entropy_weight * entropy
        with one_thread():
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def probabilities(self, choices: Sequence[int]) -> float:
        """The controller's probability of a full sequence of choices (for tests and inspection)."""
        with torch.no_grad():
            token = torch.zeros(1, dtype=torch.long)
            state, p = None, 1.0
            for t, head in enumerate(self.controller.heads):
                state = self.controller.lstm(self.controller.embedding(token), state)
                valid = list(self.decisions.valid(choices[:t]))
                probs = torch.softmax(head(state[0])[0][valid], dim=-1)
                p *= float(probs[valid.index(choices[t])])
                token = torch.tensor([self.controller.offsets[t] + choices[t]])
        return p
