"""Training data: tokenizers, token corpora (sources.py) and grain pipelines (pipeline.py)."""


class DataError(ValueError):
  """A data setting or input that cannot be used; the message is one line naming what is wrong."""
