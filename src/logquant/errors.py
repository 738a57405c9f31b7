"""The one exception type users catch: every bad input the library detects raises it."""


class LogquantError(ValueError):
    """A readable, one-line problem with what the caller passed (format, file, layer, ...).

    The CLI turns it into ``error: <message>`` on stderr and exit code 2, without a traceback.
    """


class DataError(LogquantError):
    """A missing or malformed dataset file (IDX, image folder, image)."""


class QuantizationWarning(UserWarning):
    """A result that is defined but probably not what the user wants (e.g. an outlier that
    sets a layer's range so that almost every weight quantizes to zero)."""
