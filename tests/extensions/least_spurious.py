"""A head-selection rule defined outside vitreg_jax: the head alone that follows the spurious
attribute least on ID validation data (it reads attribute labels of ID validation data).

docs/design.md, "How to add a selection rule", shows this file; tests/extension_test.py runs
it on a tiny run with `heads --select` and `heads --table`.
"""
from vitreg_jax.heads import rules


def least_spurious(context):
  """The head alone with the lowest `spurious_accuracy` on the ID validation split."""
  heads = context.table.where(kinds=('alone',))
  return rules.best_of(heads, context.roles.val_id, 'spurious_accuracy', lower_is_better=True)


RULE = rules.register(rules.Rule(
    'least_spurious', 'ID validation attribute labels', least_spurious,
    keeps='the head alone least often predicting the attribute'))
