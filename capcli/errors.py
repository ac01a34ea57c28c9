"""The one exception type that commands turn into a one-line message and exit status 1."""


class UserError(Exception):
    """A problem with the user's input (a path, a config key, a data set) that they can fix.

    The message names the input and the fix; the CLI prints it without a traceback.
    """
