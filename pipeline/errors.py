"""The one base class of errors a user can fix from the message alone.

Every stage prints such an error as one line, ``<stage>: error: <message>``, and exits
with status 2 (:func:`stages._common.run_stage`); anything else is a bug and keeps its
traceback. Each concern defines its own subclass (a bad params key, a missing dataset,
an unusable checkpoint, a method that cannot pair two models, ...), so the stage runner
needs to import none of them.
"""


class UserError(Exception):
    """An error whose message says what to fix: the file, key or value, and what is allowed."""
