"""Datasets and input pipelines: a plain dict registry and one dataset object.

```python
ds = data.open(config.data)     # resolves and checks config.data; missing files fail here
ds.info                         # num_classes, image_shape, splits, attributes, ...
it = ds.train_iterator(global_batch_size=..., seed=..., start_step=...)
for batch in ds.eval_iterator('test', global_batch_size=...): ...
out = ds.read_split('test', batch_size=..., predict=fn)   # the one reading for evaluation
```
(`data/dataset.py`: `Dataset` also owns `eval_splits`, `held_out_splits`, `normalization`,
`group_counts` and `metrics`.) Batches are dicts of NumPy arrays: `image` uint8 `[b, H, W, C]`
(not normalized: the jitted step normalizes it on the device with `ds.normalization`, see
`data/device_normalization.py`), `label` int32 `[b]`, attribute arrays int32 `[b]`
(`info.attributes`), and, in eval batches, `mask` float32 `[b]` (1 real, 0 padding).
`b = global_batch_size / process_count`.

`DATASETS` (`data/registry.py`) maps each config name to a `base.DatasetSpec`; `'dominoes'` is
the no-setup default; a dataset registered there from outside the package is opened like the
others. Importing this package imports neither TensorFlow nor TFDS; TFDS-backed datasets
import `tensorflow_datasets` when first opened. Nor does it import jax or grain (about 3 s):
config files (through `config_lib`), `data.prepare` and the reports import this package, and
the pipeline and the on-device mixing and normalization import them when they run. See
docs/data.md for every dataset, its options and how to prepare it (`python -m
vitreg_jax.data.prepare NAME`).

Every split (`train_split`, eval splits) may be sliced in TFDS's syntax, for every dataset:
`train[:6%]`, `train[:5000]`, `test[-10%:]` (`vitreg_jax.data.splits`). A dataset spec only
ever sees the unsliced split name; the slice is applied to its source by `Dataset`.
"""

from __future__ import annotations

from vitreg_jax.data.base import (CorruptDataError, DatasetInfo, DatasetNotPreparedError,
                                  DatasetSpec)
from vitreg_jax.data.dataset import Dataset, open  # pylint: disable=redefined-builtin
from vitreg_jax.data.registry import DATASETS, get_spec

__all__ = [
    'DATASETS', 'Dataset', 'DatasetInfo', 'DatasetSpec', 'DatasetNotPreparedError',
    'CorruptDataError', 'open', 'get_spec',
]
