"""Errors raised by the BN core."""
from arraybn.errors import UserError


class NonFiniteStatisticsError(UserError, FloatingPointError):
    """Batch or running statistics contain NaN or infinity.

    ``where`` names the layer (and, in the trainer, epoch and step) once a caller adds it.
    """

    def __init__(self, message, channels=(), where=None):
        self.channels = tuple(int(c) for c in channels)
        self.where = where
        self.detail = message
        super().__init__(f"{where}: {message}" if where else message)

    def located(self, where):
        """The same error, named after the layer or step it happened in."""
        place = f"{where}, {self.where}" if self.where else where
        return NonFiniteStatisticsError(self.detail, self.channels, place)
