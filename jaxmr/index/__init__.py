"""Search indexes: ANN backends (`ann`), a collection of one target's vectors (`collection`), the versioned store
and its `Searcher` (`store`), and building an index from a model (`build`, which needs the training package to
export a run and so is not imported here: the server loads only the first three)."""

from jaxmr.index.ann import AnnConfig, InvalidIndexError, JaxExactSearch, exact_search
from jaxmr.index.collection import Collection
from jaxmr.index.store import Searcher, current_version, index_info, read_manifest

__all__ = [
    "AnnConfig",
    "Collection",
    "InvalidIndexError",
    "JaxExactSearch",
    "Searcher",
    "current_version",
    "exact_search",
    "index_info",
    "read_manifest",
]
