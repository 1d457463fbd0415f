"""longctx: long-context language models in JAX — position extension, block-sparse and ring attention, evaluation."""

import setuptools

# Core versions match what the GPU machines run; keep them in step with each other.
JAX_VERSION = "0.11.2"

setuptools.setup(
    name="longctx",
    version="0.1.0",
    description="Long-context language models in JAX/Flax: context extension, sparse attention kernels, evaluation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=setuptools.find_packages(include=["longctx", "longctx.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        f"jax=={JAX_VERSION}",
        f"jaxlib=={JAX_VERSION}",
        "flax==0.12.10",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.4",
        "ml-collections==1.1.0",
        "grain>=0.2.12,<0.3",
        "array-record>=0.8",
        "tensorflow-datasets>=4.9.8",  # tfds.data_source over ArrayRecord needs no TensorFlow.
        "pyarrow>=15",
        "numpy>=1.26",
        "safetensors>=0.4",
        "gguf>=0.19",  # llama.cpp's reader and dequantiser of GGUF model files
        "tokenizers>=0.19",
        "jinja2>=3.1",  # chat templates, rendered as transformers renders them
        "sentencepiece>=0.2",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "absl-py>=2.1",
    ],
    extras_require={
        "gpu": [f"jax[cuda13]=={JAX_VERSION}"],
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        # tfds data sets stored as TFRecord (not ArrayRecord) are read through tfds.load, which needs TensorFlow.
        "tfds": ["tensorflow>=2.16"],
        # nbclient, nbformat and ipykernel run the notebooks of experiments/notebooks in the tests.
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "tensorboardX>=2.6", "nbclient>=0.10", "nbformat>=5.10",
                "ipykernel>=6.29"],
    },
    entry_points={
        "console_scripts": [
            "longctx-train=longctx.train.__main__:run",
            "longctx-eval=longctx.eval.__main__:run",
            "longctx-generate=longctx.generate:run",
        ]
    },
)
