"""megaponder: pretraining framework for pondering language models."""
from setuptools import Extension, find_packages, setup

setup(
    name="megaponder",
    version="0.1.0",
    description="Pretraining pondering language models (PonderLM, AdaPonderLM, PonderLM-2/3) "
    "on a GPT-NeoX/Pythia backbone with Megatron-style parallelism and DeepSpeed.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # The License field, not PEP 639's license_expression: setuptools >= 77 needs packaging >= 24.2
    # to read an expression, and NGC images pin an older packaging (the image build failed on it).
    # No "License ::" classifier either: setuptools >= 77 warns that those are deprecated.
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["megaponder", "megaponder.*"]),
    # The one-pass sample-index builder (CPython C API only: no numpy headers, no CUDA). Optional:
    # without a C compiler the install still succeeds and megaponder.data.sample_index uses numpy.
    ext_modules=[Extension("megaponder.data._sample_index", ["megaponder/data/_sample_index.c"],
                           optional=True)],
    install_requires=[
        "torch>=2.6",  # oldest supported (megaponder/models/compat.py); CI runs the pin
        "numpy",
        "deepspeed>=0.15",
        "pyyaml",
        "tqdm",
        "sentencepiece",
        "tokenizers",
        "zstandard",  # the Pile and most pretraining corpora ship as .jsonl.zst
    ],
    extras_require={
        "hf": ["transformers>=4.40", "safetensors", "protobuf"],
        # GPU-only: flash-attn builds against a CUDA torch with nvcc
        # (pip install --no-build-isolation 'megaponder[gpu]').
        "gpu": ["flash-attn>=2.5"],
        "mpi": ["mpi4py"],
        # SLURM node lists where scontrol is absent (GPL-2.0+, so optional; every SLURM node
        # has scontrol, which megaponder.nodelist.expand_nodelist prefers)
        "slurm": ["python-hostlist"],
        # `megaponder lm-eval` (docs/evaluation.md); lm-eval's `hf` model needs accelerate
        "eval": ["lm_eval==0.4.13", "accelerate==1.15.0"],
        "dev": ["pytest", "pytest-timeout", "transformers>=4.40", "megatron-core", "tensorboard"],
    },
    entry_points={"console_scripts": ["megaponder=megaponder.cli:main"]},
)
