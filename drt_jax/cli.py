"""Start-up shared by the command-line programs (train, eval, generate)."""

from absl import app, flags, logging


def start(argv):
  """Rejects stray positional arguments and quiets INFO logs (orbax and grain log every save)
  unless the user asked for a verbosity."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
