"""The exception types that user-facing entry points turn into a one-line message."""


class UserError(ValueError):
  """Bad input from the user: a config value, a path, a prompt. The message says what is allowed."""


class NonFiniteError(UserError):
  """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


class Interrupted(Exception):
  """The user stopped the run (Ctrl-C); what was done is saved. The command exits with status 130."""
