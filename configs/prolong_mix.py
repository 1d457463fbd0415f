"""A ProLong-style long-context data recipe (Gao et al., "How to Train Long-Context Language Models (Effectively)",
2024): long documents, code repositories and short documents mixed by share of tokens, packed with document masking
(documents concatenated, attention and positions reset at every document start), at 64K.

ProLong's 64K stage draws 30% code repositories, 30% books, 3% textbooks and 37% "ShortMix" (web, Wikipedia,
StackExchange, arXiv, math); here books and textbooks are one "long" component. The components are pre-tokenised
corpora (scripts/tokenize_corpus.py) under data/prolong/; point them elsewhere from the command line:

    python scripts/tokenize_corpus.py --source 'books/**/*.txt' --tokenizer tokenizer.json --out data/prolong/long
    python -m longctx.train --config configs/prolong_mix.py --workdir runs/prolong \\
        --config.data.mixture.code.source=arrayrecord:/data/code_repos

The model is base_config's (~76M parameters); any field applies, e.g. `--config.data.packing=decomposition` trains
the same mixture with the Dataset Decomposition curriculum instead. The step keeps matmul outputs and the flash
kernels' outputs for the backward (remat "dots_attention") and takes the cross-entropy 4,096 tokens at a time, the
settings that were fastest for the ~1B model at 32K on one H100 (docs/benchmarks.md, issue 10; not timed at this
size).
"""

import ml_collections

from longctx.config import base_config


def get_config(arg=None):
    config = base_config(arg)
    config.data.source = "mixture"
    config.data.mixture = ml_collections.ConfigDict({
        "long": {"source": "arrayrecord:data/prolong/long", "weight": 0.33},
        "code": {"source": "arrayrecord:data/prolong/code", "weight": 0.30},
        "short": {"source": "arrayrecord:data/prolong/short", "weight": 0.37},
    })
    config.data.tokenizer = "data/prolong/tokenizer.json"
    config.data.packing = "concat"
    config.data.seq_len = 65536
    config.model.remat = "dots_attention"
    config.train.batch_size = 1
    config.train.loss_chunk = 4096
    return config
