"""vitreg_jax: regularizing and analysing Vision Transformers in JAX/Flax."""

import setuptools

# A set of versions known to install and work together (Python 3.11, CPU). The core
# (models, regularizers, train step, sharding, analysis maths) needs only the first block;
# TensorFlow, TFDS and clu's writers are imported lazily by the data builders and writers.
CORE = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "absl-py",
    "numpy<2.5",
]
FULL = [
    "clu==0.0.12",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array_record==0.8.6",
    "tensorflow-cpu==2.21.0",
    "tensorboard==2.21.0",
    "protobuf<8",
    "scikit-learn",
    "scikit-image",  # the photos and faces of the embedded ARViT datasets (data/embedded*.py)
    "matplotlib",
    "tqdm",  # progress bars of the analyses
    "pillow",
    "importlib_resources",  # tensorflow_datasets needs it to build custom datasets
    "safetensors==0.8.0",  # timm weights (.safetensors) for config.init_from kind='timm'
]

setuptools.setup(
    name="vitreg_jax",
    version="0.1.0",
    description="Training, regularizing and analysing Vision Transformers in JAX/Flax.",
    packages=setuptools.find_packages(include=["vitreg_jax", "vitreg_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE + FULL,
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist"],
        # GPU clusters: CUDA 12 wheels of the same jax version.
        "cuda": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
