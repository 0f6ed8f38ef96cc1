class LetiError(Exception):
    """An error with a message meant for the user: the CLI prints it without a traceback."""
