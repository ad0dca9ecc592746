"""The error every mistake in what a user gave derives from: a config, a data file, a run folder.

The command line prints such an error as one message naming what is wrong and where, never as a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message says what is wrong and where."""
