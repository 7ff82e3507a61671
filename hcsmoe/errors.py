"""The exceptions the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after a streaming run journaled some layers: the message says how to resume."""
