"""Base for our builders: written as array_record whoever prepares them."""
import tensorflow_datasets as tfds


class RandomAccessBuilder(tfds.core.GeneratorBasedBuilder):
  """Defaults file_format to array_record (TFDS defaults to tfrecord), so that
  `tfds.data_source`, `tfds build` or `tfds.load` preparing the dataset first
  all leave it readable random-access by grain. Abstract: not registered."""

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)
