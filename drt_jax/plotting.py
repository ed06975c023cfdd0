"""Axes shared by the plots of eval and compare: context lengths on a log scale, readable."""

import matplotlib.ticker


def short_count(n: float) -> str:
  """4032 -> "4K", 64512 -> "65K", 1032192 -> "1M", 1500 -> "1.5K", 500 -> "500"."""
  for size, unit in ((10**9, "G"), (10**6, "M"), (10**3, "K")):
    if n >= size:
      value = n / size
      text = f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")
      return text + unit
  return f"{n:g}"


def length_axis(ax, lengths, train_len: int | None = None):
  """A log x axis ticked only at `lengths` (no minor labels to overlap), each labelled with its
  short size and, given train_len, its multiple of the training length on a second line."""
  lengths = sorted(set(int(n) for n in lengths))
  ax.set_xscale("log")
  ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(lengths))
  ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
  labels = [short_count(n) + (f"\n{n / train_len:.4g}x" if train_len else "") for n in lengths]
  ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter(labels))
  ax.tick_params(axis="x", labelsize=8)
  if len(lengths) > 1:  # room for the end labels
    ax.set_xlim(lengths[0] / 1.4, lengths[-1] * 1.4)
