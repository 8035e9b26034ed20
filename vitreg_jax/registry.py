"""Name -> definition registries: the one home of how extension points register.

Regularizers (`regularizers.registry.REGISTRY`), losses (`training.losses`) and head-selection
rules (`heads.rules`) are each one `Registry`; a user adds one from outside the package by
registering it, then names it in a config or on the command line. The rules are the same for
all three:
* registering a name again with a definition made at the same place (the same module and
  qualified name of its function) replaces it quietly: a config file that registers its
  regularizer or loss is executed each time it is loaded;
* a different definition under a taken name is a `UserError`, unless `replace=True`;
* an unknown name is a `UserError` listing the registered names.
(Models and datasets are plain dicts, `models.MODELS` and `data.DATASETS`, as in timm and
big_vision: they have no function whose origin would tell a reload from a clash.)
"""

from __future__ import annotations

from typing import Any, Callable

from vitreg_jax.errors import UserError


def defined_at(fn: Callable) -> tuple[str, str]:
  """Where `fn` is defined: `(module, qualified name)`."""
  return (getattr(fn, "__module__", None) or "?",
          getattr(fn, "__qualname__", None) or repr(fn))


class Registry(dict):
  """A dict of name -> definition with `register` and `get` (module docstring).

  Args:
    kind: what it holds, for messages ('regularizer', 'loss', 'selection rule').
    origin: `definition -> the function whose place identifies it` (e.g. a spec's `fn`).
  """

  def __init__(self, kind: str, origin: Callable[[Any], Callable] = lambda d: d):
    super().__init__()
    self.kind = kind
    self._origin = origin

  def register(self, name: str, definition: Any, *, replace: bool = False) -> Any:
    """Adds `definition` under `name`; returns it (`SPEC = REGISTRY.register(...)`)."""
    old = self.get_or_none(name)
    if old is not None and not replace and (
        defined_at(self._origin(old)) != defined_at(self._origin(definition))):
      module, qualname = defined_at(self._origin(old))
      raise UserError(f"A {self.kind} named {name!r} is already registered ({module}."
                      f"{qualname}): choose another name, or pass replace=True to "
                      "override it.")
    self[name] = definition
    return definition

  def get_or_none(self, name: str) -> Any:
    return dict.get(self, name)

  def lookup(self, name: str, where: str = "") -> Any:
    """The definition registered as `name`; a `UserError` naming the registered ones."""
    if name not in self:
      prefix = f"{where}: " if where else ""
      raise UserError(f"{prefix}unknown {self.kind} {name!r}; registered: {sorted(self)}.")
    return self[name]
