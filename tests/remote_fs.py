"""A stand-in remote file system for tests: `fake://bucket/...` stored under a local root.

It is not a plain path: `fake://bucket/run` goes through `etils.epath` like `gs://` does (a
path class registered for the scheme, with its own backend), so code that uses `open`,
`os.path` or `os.makedirs` on it fails or writes a relative `fake:` folder instead. Orbax
writes array data with tensorstore, not epath; `patch_orbax` maps the scheme onto
tensorstore's file driver the way orbax maps `gs://` onto tensorstore's GCS driver.
TensorFlow's file system (TensorBoard events) does not know the scheme at all, as it does not
know `s3://` without tensorflow-io.
"""

import os
import sys

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import gpath

SCHEME = "fake"
PREFIX = SCHEME + "://"
ROOT = {"path": None}  # Set by `use_root` (a test's tmp dir).


def use_root(root) -> None:
  ROOT["path"] = os.fspath(root)


def to_local(path) -> str:
  path = os.fspath(path)
  if not path.startswith(PREFIX):
    return path
  if ROOT["path"] is None:
    raise RuntimeError("remote_fs.use_root(tmp_dir) first.")
  return os.path.join(ROOT["path"], path[len(PREFIX):])


def _to_remote(local: str) -> str:
  return PREFIX + os.path.relpath(local, ROOT["path"])


class _Backend(backend_lib._OsPathBackend):  # pylint: disable=protected-access
  """The local backend on paths translated from `fake://` to the root."""

  def glob(self, path):
    return [_to_remote(p) for p in super().glob(to_local(path))]

  def walk(self, top, **kwargs):
    for root, dirs, files in super().walk(to_local(top), **kwargs):
      yield _to_remote(root), dirs, files


def _one_path(name):
  def method(self, path, *args, **kwargs):
    return getattr(backend_lib._OsPathBackend, name)(self, to_local(path), *args, **kwargs)  # pylint: disable=protected-access
  return method


def _two_paths(name):
  def method(self, path, dst, *args, **kwargs):
    return getattr(backend_lib._OsPathBackend, name)(  # pylint: disable=protected-access
        self, to_local(path), to_local(dst), *args, **kwargs)
  return method


for _name in ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "rmtree", "remove",
              "stat"):
  setattr(_Backend, _name, _one_path(_name))
for _name in ("rename", "replace", "copy"):
  setattr(_Backend, _name, _two_paths(_name))
_BACKEND = _Backend()


def _parts(*parts):
  full = "/".join(os.fspath(p) for p in parts)
  if full.startswith(PREFIX):  # Kept as /fake/... internally, as epath keeps gs:// as /gs/.
    return (full.replace(PREFIX, f"/{SCHEME}/", 1),)
  return parts


@epath.register_path_cls(PREFIX)
class FakePath(gpath.PosixGPath):
  """`epath.Path('fake://bucket/x')`."""

  if sys.version_info < (3, 12):
    def __new__(cls, *parts):
      return super().__new__(cls, *_parts(*parts))
  else:
    def __init__(self, *parts):  # pylint: disable=super-init-not-called
      super().__init__(*_parts(*parts))

  @property
  def _uri_scheme(self):
    if len(self.parts) >= 2 and self.parts[0] == "/" and self.parts[1] == SCHEME:
      return SCHEME
    return None

  @property
  def _backend(self):
    return _BACKEND


def patch_orbax(monkeypatch) -> None:
  """Orbax's tensorstore specs for `fake://` paths use the file driver under the root."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils  # pylint: disable=g-import-not-at-top
  normalize, use_gcs, gcs_spec = (ts_utils._normalize_path, ts_utils._use_gcs_driver,  # pylint: disable=protected-access
                                  gcs_utils.get_kvstore_for_gcs)
  monkeypatch.setattr(ts_utils, "_normalize_path",
                      lambda p: normalize(p).replace(f"{SCHEME}:/", PREFIX))
  monkeypatch.setattr(ts_utils, "_use_gcs_driver",
                      lambda d: d.startswith(PREFIX) or use_gcs(d))
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda p: ({"driver": "file", "path": to_local(p)}
                                 if p.startswith(PREFIX) else gcs_spec(p)))
