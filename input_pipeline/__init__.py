"""Input pipeline: offline TFDS datasets, image folders, captions, tokenizers
and grain batches."""
from input_pipeline import datasets  # noqa: F401  (registers TFDS builders)
from input_pipeline import digits_score  # noqa: F401  (evaluation's `digits` task)
from input_pipeline.pipeline import make_eval_iterator
from input_pipeline.pipeline import make_train_iterator
from input_pipeline.pipeline import num_examples
from input_pipeline.codec_baseline import codec_bits_per_dim
from input_pipeline.codec_baseline import png_bits_per_dim
from input_pipeline.codec_baseline import raw_images
from input_pipeline.sources import DatasetNotFoundError
from input_pipeline.sources import KNOWN as KNOWN_DATASETS
from input_pipeline.sources import SPLITS
from input_pipeline.text import dataset_tokenizer
from input_pipeline.text import load_tokenizer
from input_pipeline.text import resolve_tokenizer
from input_pipeline.text import Tokenizer
