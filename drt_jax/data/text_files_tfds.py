"""TFDS dataset "drt_text_files": a folder of local text files, stored as array_record.

One example (feature "text") per file, files read and ordered exactly as sources.py reads
data.source="text" (so both give the same tokens). The last VALIDATION_FRACTION of the files (at
least one) form the "validation" split, the rest "train". Build it, then train from it:

  python -m drt_jax.data.text_files_tfds --folder FOLDER --data_dir DIR
  data.source = "tfds"; data.tfds_name = "drt_text_files"; data.tfds_data_dir = DIR

TFDS reuses a built dataset: delete DIR/drt_text_files to rebuild after the files change.
"""

import argparse

import tensorflow_datasets as tfds

from drt_jax.data import DataError
from drt_jax.data import sources

VALIDATION_FRACTION = 0.05


class DrtTextFiles(tfds.core.GeneratorBasedBuilder):
  """Reads the folder passed as TFDS's manual_dir (see `prepare`)."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder of text files as manual_dir (see prepare())."

  def __init__(self, **kwargs):
    # array_record: the only format TFDS reads without tensorflow (tfds.data_source).
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling keeps the files' sorted order, as the text source reads them.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text files, one example per file.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    folder = str(dl_manager.manual_dir)
    files = sources.list_text_files(folder)
    if len(files) < 2:
      raise DataError(f"drt_text_files: {folder!r} has {len(files)} files, needs >= 2 "
                      "(train and validation)")
    num_train = len(files) - max(1, round(len(files) * VALIDATION_FRACTION))
    return {"train": self._generate_examples(files[:num_train]),
            "validation": self._generate_examples(files[num_train:])}

  def _generate_examples(self, files):
    for index, path in enumerate(files):
      text = sources.read_text_file(path)
      if text:  # skips what the text source skips: binary, non-UTF-8 and empty files
        yield index, {"text": text}


def prepare(folder: str, data_dir: str) -> DrtTextFiles:
  """Builds "drt_text_files" from `folder` under `data_dir` (a no-op when already built)."""
  builder = DrtTextFiles(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=folder))
  return builder


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folder", required=True, help="text file or folder of text files")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir to build into")
  args = parser.parse_args()
  prepare(args.folder, args.data_dir)
