"""Data: tokenizers, document sources (files, ArrayRecord, tfds, mixtures), packing, Dataset Decomposition, Untie
the Knots, and the config-driven grain pipeline (`pipeline.train_batches`) that yields batches of `tokens`,
`segment_ids`, `positions`."""

from longctx.data.array_records import ArrayRecordSource
from longctx.data.chat import ChatPrompts
from longctx.data.corpus_writer import write_corpus
from longctx.data.packing import packed_batches, packing_stats, padding_fraction, split_into_pieces, tokenize_documents
from longctx.data.sources import DocumentSource, load_documents, open_source
from longctx.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                     load_tokenizer)

__all__ = ["ArrayRecordSource", "ByteTokenizer", "ChatPrompts", "DocumentSource", "HFTokenizer",
           "SentencePieceTokenizer", "Tokenizer", "load_documents", "load_tokenizer", "open_source", "packed_batches",
           "packing_stats", "padding_fraction", "split_into_pieces", "tokenize_documents", "write_corpus"]
