"""The one exception type users catch: every bad input the library detects raises it."""


class LogquantError(ValueError):
    """A readable, one-line problem with what the caller passed (format, file, layer, ...).

    The CLI turns it into ``error: <message>`` on stderr and exit code 2, without a traceback.
    """
