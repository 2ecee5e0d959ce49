"""supernet: fast one-shot neural architecture search (DARTS / ENAS family)."""

from .eval_network import EvalNetwork, count_parameters
from .mixing import MIXING
from .ops import OPS
from .search_config import SearchConfig
from .search_network import SearchNetwork, SubNetwork, preserved_batchnorm, recalibrate_batchnorm
from .search_run import SearchResult, load_run, search
from .spaces import DARTS_GENOTYPES, Genotype, NB201Genotype, get_space, list_spaces

__version__ = "0.1.0"

__all__ = ["SearchNetwork", "SubNetwork", "EvalNetwork", "Genotype", "NB201Genotype", "DARTS_GENOTYPES", "OPS",
           "MIXING", "get_space", "list_spaces", "count_parameters", "recalibrate_batchnorm",
           "preserved_batchnorm", "search", "SearchConfig", "SearchResult", "load_run", "__version__"]
