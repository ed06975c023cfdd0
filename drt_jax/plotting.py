"""Axes shared by the plots of eval and compare: context lengths on a log scale, readable; and
eval's accuracy by question offset."""

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


def offset_figure(results: dict):
  """Accuracy against the question's offset in its chunk (eval's by_offset), one line per
  context length, the needle-retrieved fraction dashed where reported; offsets without samples
  at a length are gaps. Returns the matplotlib figure."""
  import matplotlib.pyplot as plt

  chunk_len, train_len = results["chunk_len"], results["train_len"]
  fig, ax = plt.subplots(figsize=(8, 4))
  for i, row in enumerate(results["results"]):
    color = f"C{i % 10}"
    label = f"{short_count(row['length'])} ({row['length'] / train_len:.4g}x)"
    for key, style, text in (("by_offset", "-", ""), ("retrieved_by_offset", "--",
                                                      ", needle retrieved")):
      values = row.get(key) or {}
      if not values:
        continue
      offsets = sorted(int(o) for o in values)
      ax.plot(offsets, [values[str(o)] for o in offsets], linestyle=style, marker="o",
              markersize=3, color=color, label=label + text)
  ax.set(xlim=(-0.5, chunk_len - 0.5), ylim=(-0.02, 1.02),
         xlabel=f"question offset (tokens after a chunk boundary; chunk_len {chunk_len})",
         ylabel="fraction of samples",
         title=f"{results['task']} exact match by question offset"
         + ("" if results["settings"].get("prompt_end_retrieval", True)
            else " (no prompt-end retrieval)"))
  ax.legend(fontsize=7, loc="lower left")
  return fig
