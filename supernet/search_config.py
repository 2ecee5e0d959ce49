"""What decides a search: the table of published methods, `SearchConfig`, and the network a config builds."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from . import checks, data, selection
from .devices import PRECISIONS
from .mixing import MIXING, Dirichlet
from .search_network import SearchNetwork
from .spaces import get_space, list_spaces

DATASETS = (*data.DATASETS, "tensors")
SDARTS_EPSILON_START = 0.03  # SDARTS-RS's noise bound in the first epoch (its code)
# DrNAS's progressive NB201 search (201-space/train_search_progressive.py): per stage, the partial-channel
# divisor and the candidates each edge keeps; each stage takes half the epochs (its code: 50 and 50).
DRNAS_STAGES = ((4, 5), (2, 3))
DRNAS_STAGE_WARMUP = 0.2  # weight-only share of each stage (its code: the first 10 of each 50 epochs)
SELECTIONS = ("argmax", "perturbation")


@dataclass(frozen=True)
class Method:
    """How one published search method trains: its mixing rule, alpha update and paper settings."""

    mixing: str
    arch_order: int  # 0: weights only, 1: first-order alphas, 2: unrolled (second-order) alphas
    arch_first: bool  # DARTS updates alphas before weights in a step; GDAS after
    a_lr: float  # Adam learning rate for the architecture parameters
    w_weight_decay: float
    warmup_fraction: float  # share of epochs before alphas start to move (PC-DARTS: 15 of 50)
    summary: str
    regulariser: str | None = None  # a term added to the alpha step's validation loss (architect.REGULARISERS)

    @property
    def learns_alphas(self) -> bool:
        """Whether a search step updates the architecture parameters."""
        return MIXING.get(self.mixing).learns_alphas and self.arch_order > 0

    @property
    def anneals_temperature(self) -> bool:
        """Whether the mixing rule has a temperature the search anneals (GDAS)."""
        return MIXING.get(self.mixing).anneals_temperature

    @property
    def decays_aux_skip(self) -> bool:
        """Whether the mixing rule has an auxiliary skip weight the search decays (DARTS-)."""
        return MIXING.get(self.mixing).decays_aux_skip

    @property
    def projectable(self) -> bool:
        """Whether perturbation-based selection applies: alphas learned, every candidate run with a weight."""
        return self.learns_alphas and MIXING.get(self.mixing).weights_every_candidate

    @property
    def smooths_weight_step(self) -> bool:
        """Whether the weight step mixes with perturbed weights whose noise the search grows (SDARTS-RS)."""
        return MIXING.get(self.mixing).smooths_weight_step


METHODS = {
    "darts": Method("softmax", 1, True, 3e-4, 3e-4, 0.0, "DARTS, first order (softmax over all candidates)"),
    "darts-2nd": Method("softmax", 2, True, 3e-4, 3e-4, 0.0,
                        "DARTS, second order (unrolled step, finite-difference Hessian-vector product)"),
    "gdas": Method("gumbel", 1, False, 3e-4, 5e-4, 0.0, "GDAS (one hard Gumbel-softmax path per edge, tau 10 -> 0.1)"),
    "pc-darts": Method("partial", 1, True, 6e-4, 3e-4, 0.3,
                       "PC-DARTS (1/k of the channels, edge normalisation, alpha warm-up)"),
    "drnas": Method("dirichlet", 1, True, 3e-4, 3e-4, 0.0,
                    "DrNAS (Dirichlet architecture distribution: a reparameterised sample per step, the mean "
                    "for derivation; alphas regularised by Adam's weight decay, or with reg_scale > 0 by a KL "
                    "term toward Dirichlet(1) instead)",
                    regulariser="dirichlet-kl"),
    "beta-darts": Method("softmax", 1, True, 3e-4, 3e-4, 0.0,
                         "beta-DARTS (DARTS first order plus the beta-decay regulariser lambda * mean logsumexp "
                         "(alpha), lambda = beta_lambda * epoch / epochs)", regulariser="beta-decay"),
    "darts-minus": Method("aux-skip", 1, True, 3e-4, 3e-4, 0.0,
                          "DARTS- (DARTS first order plus an auxiliary skip beta * x on every edge, beta "
                          "decayed linearly from 1 to 0)"),
    "sdarts": Method("random-smoothing", 1, True, 3e-4, 3e-4, 0.0,
                     "SDARTS-RS (DARTS first order; the weight step mixes with clip(softmax(alpha) + U(-eps, eps)), "
                     "eps growing linearly from 0.03 toward sdarts_epsilon)"),
    "spos": Method("sample", 0, True, 0.0, 3e-4, 0.0,
                   "single path, uniform sampling (SPOS / ENAS style); the best of spos_candidates is derived"),
}


def _optional_text(name: str, value: object) -> str | None:
    """None, or a string (a path-like value is kept as its string)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise ValueError(f"{name} must be a string or None, got {value!r}")


@dataclass
class SearchConfig:
    """Everything that decides a search's result. Defaults are the main job: a few minutes on 2 CPU cores."""

    method: str = "darts"
    space: str = "darts"
    dataset: str = "digits"  # 'digits' (embedded), 'cifar10' or 'omniglot' (need data_dir), 'tensors' (passed in)
    data_dir: str | None = None
    data_fingerprint: str | None = None  # set for dataset='tensors', so a resume checks it gets the same data
    max_train: int | None = None  # cap on the non-test examples (for a quick look at a large dataset)
    val_fraction: float = 0.5  # of the non-test data: the split the alphas are fitted on (DARTS: half)
    test_fraction: float = 0.2  # held out for the final accuracies (unused when the dataset has a test set)
    augment: bool | None = None  # random 4-pixel-padded crops and flips of training batches, as DARTS and
    #                              NAS-Bench-201 train on CIFAR-10; None: on for cifar10 only
    seed: int = 0
    C: int = 8  # initial channels of the search network (DARTS: 16)
    layers: int = 5  # cells, reductions at 1/3 and 2/3 (DARTS: 8)
    epochs: int = 6  # (DARTS: 50)
    batch_size: int = 64  # the GLOBAL batch: under torchrun each of W ranks takes batch_size / W of it
    micro_batches: int = 1  # the batch is cut into this many parts, each with its own batch-norm statistics
    #                        (a data-parallel run cuts it into at least W: one or more per rank)
    precision: str = "fp32"  # fp32, bf16 or fp16: autocast for the network; alphas and their softmax stay fp32
    steps_per_epoch: int | None = None  # cap on steps per epoch (None: one pass over the training split)
    w_lr: float = 0.025  # SGD with momentum, cosine schedule down to w_lr_min (DARTS)
    w_lr_min: float = 0.001
    w_momentum: float = 0.9
    w_weight_decay: float | None = None  # None: the method's paper value
    grad_clip: float = 5.0
    a_lr: float | None = None  # Adam for the alphas, betas (0.5, 0.999); None: the method's paper value
    a_weight_decay: float = 1e-3
    arch_warmup_epochs: int | None = None  # epochs of weight-only training first; None: the method's share
    unrolled_xi: float | None = None  # darts-2nd virtual step size; None: the current weight learning rate
    partial_k: int = 4  # pc-darts channel divisor
    tau_max: float = 10.0  # gdas temperature, annealed linearly to tau_min over the epochs
    tau_min: float = 0.1
    spos_candidates: int = 20  # spos: random subnets ranked on the validation split to pick the result
    reg_scale: float = 0.0  # drnas: weight of a KL term toward Dirichlet(1) that replaces the alphas' weight decay
    #                          (DrNAS's reg_type 'kl'); 0: weight decay a_weight_decay, DrNAS's default ('l2')
    beta_lambda: float = 50.0  # beta-darts: regulariser weight beta_lambda * epoch / epochs (its code: 50)
    sdarts_epsilon: float = 0.3  # sdarts: the weight step's noise bound grows linearly from 0.03 toward this
    #                              (0.03 + (sdarts_epsilon - 0.03) * epoch / epochs; its code: 0.3)
    drnas_progressive: bool = False  # drnas, nb201: DrNAS's progressive search (DRNAS_STAGES): the first half of
    #                                  the epochs on 1/4 of the channels, the second on 1/2 with each edge pruned
    #                                  to its 3 best candidates; arch_warmup_epochs then counts per stage
    selection: str = "argmax"  # how the architecture is read off the supernet: 'argmax' (the space's rule on the
    #                            alphas) or 'perturbation' (DARTS-PT, supernet.selection: after the search, edges
    #                            are fixed one at a time to the candidate whose removal costs the most validation
    #                            accuracy, then nodes to their inputs (darts), the supernet tuned in between)
    projection_interval: int = 5  # perturbation: tuning epochs between two projections (DARTS-PT's proj_intv)
    projection_criterion: str = "accuracy"  # perturbation: what a removal costs, selection.CRITERIA (DARTS-PT's
    #                                         proj_crit): validation 'accuracy' lost, or 'loss' gained
    hessian_every: int = 0  # every N epochs, the dominant eigenvalue of the alpha Hessian (0: never)
    checkpoint_every: int = 0  # steps between checkpoints inside an epoch (0: at the end of each epoch only)
    retrain_epochs: int = 6  # retraining of the derived and a random architecture (0: skip)
    retrain_C: int = 8
    retrain_layers: int = 5
    retrain_lr: float = 0.05  # SGD, cosine schedule over all retraining steps (DARTS's evaluation settings)
    retrain_momentum: float = 0.9
    retrain_nesterov: bool = True
    retrain_weight_decay: float = 3e-4
    retrain_grad_clip: float = 5.0
    retrain_batch_size: int = 64

    def __post_init__(self) -> None:
        checks.choice("method", self.method, METHODS)
        checks.choice("space", self.space, list_spaces())
        checks.choice("dataset", self.dataset, DATASETS)
        m = METHODS[self.method]
        if self.w_weight_decay is None:
            self.w_weight_decay = m.w_weight_decay
        if self.a_lr is None:
            self.a_lr = m.a_lr
        checks.choice("precision", self.precision, PRECISIONS)
        if self.precision == "fp16" and m.arch_order == 2:
            raise ValueError("precision fp16 is not supported with darts-2nd (its finite-difference step would "
                             "need unscaled gradients); use bf16 or fp32")
        for name in ("C", "layers", "epochs", "batch_size", "micro_batches", "retrain_C", "retrain_layers",
                     "retrain_batch_size", "partial_k", "spos_candidates", "projection_interval"):
            checks.integer(name, getattr(self, name))
        for name in ("retrain_epochs", "checkpoint_every", "seed", "hessian_every"):
            checks.integer(name, getattr(self, name), minimum=0)
        checks.optional_integer("steps_per_epoch", self.steps_per_epoch)
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batches={self.micro_batches}")
        checks.optional_integer("max_train", self.max_train, minimum=2)
        checks.fraction("val_fraction", self.val_fraction)
        checks.fraction("test_fraction", self.test_fraction)
        for name in ("w_lr", "w_lr_min", "grad_clip", "tau_max", "tau_min", "retrain_lr", "retrain_grad_clip"):
            checks.number(name, getattr(self, name), positive=True)
        for name in ("w_weight_decay", "a_weight_decay", "retrain_weight_decay", "reg_scale", "beta_lambda"):
            checks.number(name, getattr(self, name), non_negative=True)
        for name in ("w_momentum", "retrain_momentum"):
            checks.number(name, getattr(self, name), non_negative=True, maximum=1.0, open_maximum=True)
        checks.optional_number("unrolled_xi", self.unrolled_xi, non_negative=True)
        if self.augment is None:
            self.augment = self.dataset == "cifar10"
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be True or False, got {self.augment!r}")
        if not isinstance(self.retrain_nesterov, bool):
            raise ValueError(f"retrain_nesterov must be True or False, got {self.retrain_nesterov!r}")
        if self.retrain_nesterov and self.retrain_momentum == 0:
            raise ValueError("retrain_nesterov needs a positive retrain_momentum")
        self.data_dir = _optional_text("data_dir", self.data_dir)
        self.data_fingerprint = _optional_text("data_fingerprint", self.data_fingerprint)
        if m.learns_alphas:
            checks.number("a_lr", self.a_lr, positive=True)
        else:
            checks.number("a_lr", self.a_lr, non_negative=True)
        self._check_drnas_progressive()
        self._check_selection()
        if self.arch_warmup_epochs is None:
            self.arch_warmup_epochs = (int(DRNAS_STAGE_WARMUP * self.stage_epochs[0]) if self.drnas_progressive
                                       else int(m.warmup_fraction * self.epochs))
        checks.integer("arch_warmup_epochs", self.arch_warmup_epochs, minimum=0)
        if self.drnas_progressive and self.arch_warmup_epochs >= self.stage_epochs[0]:
            raise ValueError(f"arch_warmup_epochs={self.arch_warmup_epochs} counts per stage with drnas_progressive "
                             f"and must be below the first stage's {self.stage_epochs[0]} epochs (epochs="
                             f"{self.epochs}): the alphas would never move in it")
        if m.learns_alphas and self.arch_warmup_epochs >= self.epochs:
            raise ValueError(f"arch_warmup_epochs={self.arch_warmup_epochs} must be below epochs={self.epochs}: "
                             f"{self.method} would never train its architecture parameters")
        # the noise bound grows from SDARTS_EPSILON_START at the first epoch toward sdarts_epsilon
        checks.number("sdarts_epsilon", self.sdarts_epsilon, minimum=SDARTS_EPSILON_START, maximum=1)
        if m.anneals_temperature and self.tau_min > self.tau_max:
            raise ValueError(f"tau_min={self.tau_min} must not exceed tau_max={self.tau_max}")

    def _check_drnas_progressive(self) -> None:
        if not isinstance(self.drnas_progressive, bool):
            raise ValueError(f"drnas_progressive must be True or False, got {self.drnas_progressive!r}")
        if not self.drnas_progressive:
            return
        if self.method != "drnas":
            raise ValueError(f"drnas_progressive is DrNAS's schedule; it needs method='drnas', not {self.method!r}")
        if self.space != "nb201":
            raise ValueError(f"drnas_progressive supports the nb201 space only (its widening copies plain "
                             f"convolutions' channels), not {self.space!r}")
        if self.epochs < 2:
            raise ValueError(f"drnas_progressive needs epochs >= 2 (two stages), got {self.epochs}")
        divisor = DRNAS_STAGES[0][0]
        if self.C % divisor:
            raise ValueError(f"drnas_progressive runs candidates on 1/{divisor} of the channels: C={self.C} must be "
                             f"divisible by {divisor}")

    def _check_selection(self) -> None:
        checks.choice("selection", self.selection, SELECTIONS)
        checks.choice("projection_criterion", self.projection_criterion, selection.CRITERIA)
        if self.selection != "perturbation":
            return
        if not self.method_spec.projectable:
            usable = [k for k, m in METHODS.items() if m.projectable]
            raise ValueError(f"selection='perturbation' masks candidates of a weighted supernet; it works with "
                             f"{usable}, not {self.method!r}")
        if self.drnas_progressive:
            raise ValueError("selection='perturbation' cannot follow drnas_progressive (pruned, partial-channel "
                             "candidates); use one or the other")

    @property
    def tuning_epochs(self) -> int:
        """Epochs after the search in which perturbation-based selection tunes the supernet (0 for argmax)."""
        if self.selection != "perturbation":
            return 0
        return selection.tuning_epochs(selection.projection_events(get_space(self.space)), self.projection_interval)

    @property
    def total_epochs(self) -> int:
        """Search epochs plus the selection's tuning epochs."""
        return self.epochs + self.tuning_epochs

    @property
    def stage_epochs(self) -> tuple[int, ...]:
        """Epochs per stage: one stage, or with drnas_progressive the first half (rounded down) and the rest."""
        if not self.drnas_progressive:
            return (self.epochs,)
        return (self.epochs // 2, self.epochs - self.epochs // 2)

    @property
    def method_spec(self) -> Method:
        """The method's table entry."""
        return METHODS[self.method]

    @property
    def regulariser(self) -> str | None:
        """The term added to the alpha step's loss, if any (DrNAS's KL term only with reg_scale > 0)."""
        name = self.method_spec.regulariser
        return None if name == "dirichlet-kl" and self.reg_scale == 0 else name

    @property
    def alpha_weight_decay(self) -> float:
        """Adam's weight decay on the alphas: a_weight_decay, except 0 where DrNAS's KL term replaces it."""
        return 0.0 if self.regulariser == "dirichlet-kl" else self.a_weight_decay

    def to_dict(self) -> dict:
        """The config as a JSON-able dict (what a checkpoint header and config.json hold)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        """The config from a dict of its fields; ValueError naming unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown search options {unknown}; expected some of {sorted(known)}")
        return cls(**d)


def build_network(config: SearchConfig, num_classes: int, in_channels: int) -> SearchNetwork:
    """The search network a config describes (weights drawn from torch's global RNG)."""
    mixing = Dirichlet(DRNAS_STAGES[0][0]) if config.drnas_progressive else config.method_spec.mixing
    return SearchNetwork(config.space, C=config.C, layers=config.layers, num_classes=num_classes,
                         in_channels=in_channels, mixing=mixing, partial_k=config.partial_k, tau=config.tau_max)
