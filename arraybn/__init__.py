"""arraybn: Batch Normalization research toolkit (NumPy, Numba and CuPy/CUDA backends)."""
from arraybn._version import __version__
from arraybn.backends import (BACKEND_NAMES, BackendUnavailableError, available_backends,
                              get_backend)
from arraybn.core import (AverageStatistics, BNCache, EMAStatistics, ExactStatistics,
                          NonFiniteStatisticsError, PopulationStatistics, batch_norm_backward,
                          batch_norm_forward, make_estimator)

__all__ = ["__version__", "BACKEND_NAMES", "BackendUnavailableError", "available_backends",
           "get_backend", "batch_norm_forward", "batch_norm_backward", "BNCache",
           "NonFiniteStatisticsError", "PopulationStatistics", "ExactStatistics",
           "AverageStatistics", "EMAStatistics", "make_estimator"]
