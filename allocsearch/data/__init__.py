"""Calibration data: text sources, tokenizers, fixed seeded token sets, the demo corpus.

Typical use::

    docs = load_documents("corpus/", pattern="*.txt")
    calibration, heldout = build_tokensets(
        docs, load_tokenizer("bytes"), seq_len=512, n_calibration_seqs=128, seed=0
    )
    batch = minibatch(calibration, 2048, 7)  # int32[4, 512]
"""

from allocsearch.data.demo_corpus import (
    HELDOUT_MODULES,
    TRAIN_MODULES,
    demo_documents,
    demo_tokensets,
    module_source_path,
)
from allocsearch.data.encoder_sets import encoder_tokensets
from allocsearch.data.sources import (
    Document,
    describe_documents,
    load_documents,
    read_directory,
    read_glob,
    read_hf_dataset,
    read_jsonl,
    read_text_file,
)
from allocsearch.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from allocsearch.data.tokenset import (
    DOCUMENT_SEPARATOR,
    TokenSet,
    build_tokensets,
    calibration_tokenset,
    encode_documents,
    heldout_tokenset,
    minibatch,
)

__all__ = [
    "DOCUMENT_SEPARATOR",
    "HELDOUT_MODULES",
    "TRAIN_MODULES",
    "ByteTokenizer",
    "Document",
    "HFTokenizer",
    "TokenSet",
    "Tokenizer",
    "build_tokensets",
    "calibration_tokenset",
    "demo_documents",
    "demo_tokensets",
    "describe_documents",
    "encode_documents",
    "encoder_tokensets",
    "heldout_tokenset",
    "load_documents",
    "load_tokenizer",
    "minibatch",
    "module_source_path",
    "read_directory",
    "read_glob",
    "read_hf_dataset",
    "read_jsonl",
    "read_text_file",
]
