"""Waterbirds (Sagawa et al. 2020, "Distributionally Robust Neural Networks", Sec. 5 / App. C).

Source: the released folder `waterbird_complete95_forest2water2/` (CUB birds pasted on
Places backgrounds) with `metadata.csv` (columns `img_id, img_filename, y, split, place,
place_filename`) and the images under `<species folder>/<file>.jpg`. Put the folder (or its
contents) in the manual directory and run
`python -m vitreg_jax.data.prepare waterbirds --manual_dir=DIR --data_dir=DIR2`.

Examples: `label = y` (0 landbird, 1 waterbird), attribute `place` (0 land, 1 water),
`group = 2 * y + place` (0 landbird/land, 1 landbird/water, 2 waterbird/land,
3 waterbird/water). Splits: `split` 0/1/2 -> train / val / test. Metrics: per-group and
worst-group accuracy via `vitreg_jax.metrics.group_metrics(..., group=batch['group'])`.

Preprocessing (the authors' code for CUB): eval resizes to a square of
`image_size / 0.875` (256 for 224) and centre-crops `image_size`; train with `augment=True`
(default) takes a random-resized crop with area fraction in [0.7, 1] and aspect ratio in
[3/4, 4/3] to `image_size`, then a random horizontal flip; ImageNet mean/std.
"""

from __future__ import annotations

import csv
import functools
import io
import os

from etils import epath
from PIL import Image

from vitreg_jax.data import preprocess
from vitreg_jax.data.base import CorruptDataError, DatasetNotPreparedError, TfdsDataset

FOLDER = 'waterbird_complete95_forest2water2'
COLUMNS = ('img_filename', 'y', 'split', 'place')
SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}

INSTRUCTIONS = f"""Waterbirds needs the released folder in the manual directory:
  {{manual_dir}}/{FOLDER}/metadata.csv
  {{manual_dir}}/{FOLDER}/001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg
  ... (one sub-folder per CUB species, as listed in metadata.csv's img_filename)
(metadata.csv directly in {{manual_dir}} is accepted too.) Get it from
https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz and extract it there."""


def find_root(manual_dir: str) -> str:
  """The folder holding metadata.csv: `manual_dir/FOLDER` or `manual_dir` itself."""
  for root in (os.path.join(manual_dir, FOLDER), manual_dir):
    if os.path.isfile(os.path.join(root, 'metadata.csv')):
      return root
  raise DatasetNotPreparedError(
      f'metadata.csv not found in {manual_dir} or {os.path.join(manual_dir, FOLDER)}.\n'
      + INSTRUCTIONS.format(manual_dir=manual_dir))


def read_metadata(root: str) -> list:
  """Rows of metadata.csv as dicts with int `y`, `split`, `place`; checks files exist.

  Raises:
    CorruptDataError: naming metadata.csv if a column or value is wrong.
    DatasetNotPreparedError: listing (up to 5) images that metadata.csv names but are missing.
  """
  path = os.path.join(root, 'metadata.csv')
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    missing_cols = set(COLUMNS) - set(reader.fieldnames or ())
    if missing_cols:
      raise CorruptDataError(f'{path}: missing column(s) {sorted(missing_cols)}; '
                             f'found {reader.fieldnames}.')
    rows = []
    for line, row in enumerate(reader, start=2):
      try:
        rows.append({'img_filename': row['img_filename'], 'y': int(row['y']),
                     'split': int(row['split']), 'place': int(row['place'])})
      except (TypeError, ValueError):
        raise CorruptDataError(f'{path}, line {line}: bad row {row}.') from None
      if rows[-1]['y'] not in (0, 1) or rows[-1]['place'] not in (0, 1) or \
          rows[-1]['split'] not in (0, 1, 2):
        raise CorruptDataError(f'{path}, line {line}: y/place must be 0/1 and split 0/1/2, '
                               f'got {row}.')
  missing = [r['img_filename'] for r in rows
             if not os.path.isfile(os.path.join(root, r['img_filename']))]
  if missing:
    raise DatasetNotPreparedError(
        f'{len(missing)} image(s) listed in {path} are missing under {root}, e.g. '
        f'{missing[:5]}.\n' + INSTRUCTIONS.format(manual_dir=os.path.dirname(root)))
  return rows


def read_checked_image(path: str) -> bytes:
  """The file's bytes, after checking it decodes completely (reports the file if not)."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if img.format != 'JPEG':
        raise ValueError(f'expected a JPEG, got {img.format}')
  except (OSError, ValueError, SyntaxError) as e:
    raise CorruptDataError(f'{path}: corrupt or truncated image ({e}).') from None
  return data


@functools.lru_cache(maxsize=1)
def builder_class():
  """Defines (once) and returns the TFDS builder class; imports TFDS."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class Waterbirds(tfds.core.GeneratorBasedBuilder):
    """Waterbirds from the released folder (see vitreg_jax/data/waterbirds.py)."""
    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS.format(manual_dir='<manual_dir>')
    code_path = epath.Path(__file__)  # see mnist_cifar.builder_class

    def _info(self):
      return self.dataset_info_from_configs(
          features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
              'label': tfds.features.ClassLabel(names=['landbird', 'waterbird']),
              'place': tfds.features.ClassLabel(names=['land', 'water']),
              'group': tfds.features.ClassLabel(num_classes=4),
              'filename': tfds.features.Text(),
          }),
          supervised_keys=('image', 'label'),
          description=__doc__)

    def _split_generators(self, dl_manager):
      root = find_root(os.fspath(dl_manager.manual_dir))
      rows = read_metadata(root)
      return {name: self._generate_examples(root, [r for r in rows if r['split'] == sid])
              for name, sid in SPLIT_IDS.items()}

    def _generate_examples(self, root, rows):
      for r in rows:
        yield r['img_filename'], {
            'image': read_checked_image(os.path.join(root, r['img_filename'])),
            'label': r['y'], 'place': r['place'], 'group': 2 * r['y'] + r['place'],
            'filename': r['img_filename'],
        }

  return Waterbirds


class WaterbirdsDataset(TfdsDataset):
  """Registry entry 'waterbirds'."""
  options = preprocess.imagenet_options(crop_scale=(0.7, 1.0))
  split_map = {'train': 'train', 'val': 'val', 'test': 'test'}
  num_classes = 2
  attributes = ('place', 'group')
  attribute_classes = {'place': 2, 'group': 4}
  default_eval_splits = ('val', 'test')
  tfds_name = 'waterbirds'
  description = 'Waterbirds (landbird/waterbird on land/water backgrounds)'
  prepare_hint = INSTRUCTIONS
  downloads = False  # the released folder is a manual download

  def builder(self, config: dict):
    return builder_class()(data_dir=config['data_dir'])

  def prepare(self, config: dict) -> None:
    # Check the manual files first: TFDS would only assert that the directory is non-empty.
    read_metadata(find_root(config['manual_dir']))
    super().prepare(config)

  def transform(self, config: dict, split: str, train: bool):
    return preprocess.ImageTransform(
        size=int(config['image_size']), train=train, augment=config['augment'],
        crop_fraction=config['crop_fraction'], scale=config['crop_scale'],
        mean=config['mean'], std=config['std'], attributes=self.attributes,
        square_resize=True, name_key='filename')
