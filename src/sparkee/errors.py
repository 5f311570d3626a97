"""The one exception type users see: its message is a single sentence naming the problem."""


class SparkeeError(ValueError):
    """A bad input or an unusable file. The CLI prints the message alone and exits with status 2."""
