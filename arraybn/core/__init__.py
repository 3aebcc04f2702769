"""The BN core: backend-agnostic maths, statistics estimators and their errors."""
from arraybn.core.batch_norm import BNCache, batch_norm_backward, batch_norm_forward
from arraybn.core.errors import NonFiniteStatisticsError
from arraybn.core.population import (AverageStatistics, EMAStatistics, ExactStatistics,
                                     PopulationStatistics, make_estimator)

__all__ = ["BNCache", "batch_norm_forward", "batch_norm_backward", "NonFiniteStatisticsError",
           "PopulationStatistics", "ExactStatistics", "AverageStatistics", "EMAStatistics",
           "make_estimator"]
