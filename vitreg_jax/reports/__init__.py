"""Reports: tables in the papers' layouts and learning curves, read back from run workdirs.

  python -m vitreg_jax.reports WORKDIR_OR_PARENT... [--out DIR] [--target 0.8]

* `runs.py`: reading workdirs (config.json, metrics.jsonl, heads.json), grouping seeds.
* `tables.py`: every table (runs, the poster's, ARViT's, "How do ViTs work?"), Markdown + CSV.
* `papers.py`: every paper's published figures and table layouts, the poster's included.
* `curves.py`: learning curves of a table's runs.
* `__main__.py`: the command (`python -m vitreg_jax.reports`, or `.report`).

Light on purpose (no JAX, no TensorFlow): reading results back is quick on any machine.
"""
