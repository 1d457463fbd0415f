"""Data: tokenizers, document sources and grain packing into batches of `tokens`, `segment_ids`, `positions`."""

from longctx.data.packing import packed_batches, padding_fraction, split_into_pieces, tokenize_documents
from longctx.data.sources import load_documents
from longctx.data.tokenizers import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                     load_tokenizer)

__all__ = ["ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "Tokenizer", "load_documents",
           "load_tokenizer", "packed_batches", "padding_fraction", "split_into_pieces", "tokenize_documents"]
