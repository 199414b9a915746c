"""Input data: the embedded stdlib corpus (TFDS), other text sources, byte tokenizer, row index, grain pipeline."""
from sparsejax.data.checkpoint import iterator_restore_args, iterator_save_args
from sparsejax.data.pipeline import make_dataset, make_iterator, row_plan
from sparsejax.data.sources import check_dataset, text_source
from sparsejax.data.stdlib_corpus import StdlibText, default_data_dir, stdlib_builder
from sparsejax.data.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "StdlibText",
    "check_dataset",
    "default_data_dir",
    "iterator_restore_args",
    "iterator_save_args",
    "make_dataset",
    "make_iterator",
    "row_plan",
    "stdlib_builder",
    "text_source",
]
