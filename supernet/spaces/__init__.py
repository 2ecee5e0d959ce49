"""Search spaces behind one registry: `list_spaces()`, `get_space(name)`."""

from ..registry import Registry
from .base import CellSpace, Path, Paths
from .darts import GENOTYPES as DARTS_GENOTYPES
from .darts import PRIMITIVES, DartsSpace, Genotype
from .nb201 import NB201_OPS, NB201Genotype, NB201Space

SPACES: Registry[CellSpace] = Registry("search space")
SPACES.add("darts", DartsSpace())
SPACES.add("nb201", NB201Space())


def list_spaces(pattern: str = "*") -> list[str]:
    """Names of the registered search spaces."""
    return SPACES.names(pattern)


def get_space(space: "str | CellSpace") -> CellSpace:
    """The search space registered under `name` (a space passes through)."""
    return space if isinstance(space, CellSpace) else SPACES.get(space)


__all__ = ["CellSpace", "Path", "Paths", "Genotype", "NB201Genotype", "PRIMITIVES", "NB201_OPS",
           "DARTS_GENOTYPES", "DartsSpace", "NB201Space", "SPACES", "list_spaces", "get_space"]
