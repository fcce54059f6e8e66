"""The one exception type that user-facing entry points turn into a one-line message."""


class UserError(ValueError):
  """Bad input from the user: a config value, a path, a prompt. The message says what is allowed."""
