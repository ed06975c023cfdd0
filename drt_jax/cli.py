"""Start-up shared by the command-line programs (train, eval, generate)."""

import re
import sys

from absl import app, flags, logging


def start(argv):
  """Rejects stray positional arguments and quiets INFO logs (orbax and grain log every save)
  unless the user asked for a verbosity."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def parse_flags(argv):
  """absl's parser (`app.run(main, flags_parser=cli.parse_flags)`), but an override of a config
  field or section that does not exist is one line, e.g.
  `error: --config.model.topkk=3: no field model.topkk (did you mean model.topk?)`, not the
  KeyError that a locked ConfigDict raises from inside flag parsing."""
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as error:
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]  # ConfigDict wraps its KeyError in an AttributeError
    message = str(error.args[0]) if error.args else ""
    name = message.splitlines()[0].strip("'\"")
    suggestion = re.search(r'Did you mean "([^"]+)"', message)
    for arg in argv[1:]:
      match = re.fullmatch(r"--(\w+)\.([\w.]+)(?:=.*)?", arg)
      if match and name in match[2].split("."):
        path = match[2].split(".")
        where = path[:path.index(name)]
        hint = (f" (did you mean {'.'.join(where + [suggestion[1]])}?)" if suggestion else "")
        kind = "section" if len(path) > len(where) + 1 else "field"
        sys.exit(f"error: {arg}: no config {kind} {'.'.join(where + [name])}{hint}")
    raise
