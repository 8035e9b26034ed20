"""The extension points used from outside the package, as docs/design.md's "How to add ..."
shows them: a regularizer, a loss, a dataset, a selection rule and an analysis, each one module
in `tests/extensions/` (not in vitreg_jax), run with the package's own commands.

One tiny run carries the regularizer, the loss and the dataset (2 steps, per-head figures at
both); the rule then chooses on its checkpoint (`heads --select`) and over its per-eval
records (`heads --table`), and the analysis reads its checkpoint.
"""

import importlib
import json
import os
import sys
import types

from absl import flags
import ml_collections
import numpy as np
import pytest

from vitreg_jax import config_lib
from vitreg_jax import data
from vitreg_jax import errors
from vitreg_jax import regularizers
from vitreg_jax.analysis import runs
from vitreg_jax.heads import __main__ as heads_main
from vitreg_jax.heads import rules
from vitreg_jax.training import losses
from vitreg_jax.training import rundir
from vitreg_jax.training import train

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, "extensions")
DESIGN = os.path.join(HERE, os.pardir, "docs", "design.md")
NAMES = ("attention_entropy", "focal", "least_spurious", "toy_stripes", "logit_margin")
# What each example registers, taken back after this module: other test files on the same
# worker list the package's own names.
REGISTERED = ((regularizers.REGISTRY, "attention_entropy"), (losses.REGISTRY, "focal"),
              (rules.REGISTRY, "least_spurious"), (data.DATASETS, "toy_stripes"))


@pytest.fixture(scope="module", autouse=True)
def examples():
  """The examples imported as a user's modules (from outside the package), registering what
  they define, for this module's tests only."""
  sys.path.insert(0, EXAMPLES)
  try:
    yield types.SimpleNamespace(**{n: importlib.import_module(n) for n in NAMES})
  finally:
    sys.path.remove(EXAMPLES)
    for name in NAMES:
      sys.modules.pop(name, None)
    for registry, name in REGISTERED:
      registry.pop(name, None)


def _code(name: str) -> str:
  """The example's code after its module docstring (what design.md shows)."""
  text = open(os.path.join(EXAMPLES, f"{name}.py")).read()
  return text.split('"""', 2)[2].strip()


def test_design_md_shows_every_example_as_it_is_tested():
  design = open(DESIGN).read()
  for name in NAMES:
    assert _code(name) in design, f"docs/design.md does not show tests/extensions/{name}.py"


def _config(path: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      model_name="vit", model=dict(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4),
      data=dict(name="toy_stripes", path=path), batch_size=16, eval_batch_size=32,
      total_steps=2, eval_every_steps=1, checkpoint_every_steps=2, log_every_steps=1,
      head_eval="all", loss=dict(name="focal", focal_gamma=3.0),
      regularizers=[dict(name="attention_entropy", weight=0.1, layers=(-1,),
                         over="patches")]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, examples):
  folder = tmp_path_factory.mktemp("toy_stripes")
  workdir = str(tmp_path_factory.mktemp("run"))
  results = train.train_and_evaluate(_config(examples.toy_stripes.write(str(folder))), workdir)
  return workdir, results, str(folder)


def _train_lines(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [l for l in lines if l.get("split") == "train"]


def test_a_dataset_from_outside_trains_and_reports_its_groups(run):
  workdir, results, folder = run
  assert set(results) == {"val_id", "val_ood", "test_id", "test_ood"}
  assert results["val_ood"]["num_examples"] == 64
  assert "worst_group_accuracy" in results["test_ood"]
  ds = data.open(dict(name="toy_stripes", path=os.path.join(folder, "{split}.npz")))
  assert ds.info.name == "toy_stripes" and ds.info.num_classes == 2
  assert ds.group_counts().sum() == 64
  with pytest.raises(errors.UserError, match=r"Unknown split 'val'.*toy_stripes"):
    data.open(dict(name="toy_stripes", path=os.path.join(folder, "{split}.npz"),
                   eval_splits=("val",)))


def test_a_regularizer_from_outside_is_trained_and_pushes(run):
  lines = _train_lines(run[0])
  assert [l["step"] for l in lines] == [1, 2]
  for l in lines:
    term = l["reg/attention_entropy"]
    assert 0 < term <= np.log(4) + 1e-6  # 2 x 2 patches: a row's entropy is at most log 4.
    assert l["balance/attention_entropy_grad_norm"] > 0  # It reaches the parameters.
  bad = _config("unused")
  bad.regularizers = [dict(name="attention_entropy", weight=0.1, layers=(-1,), over="patch")]
  with pytest.raises(errors.UserError, match=r"over.*\['tokens', 'patches'\]"):
    config_lib.with_defaults(bad)


def test_a_loss_from_outside_is_the_one_minimized(run):
  for l in _train_lines(run[0]):
    assert l["focal_gamma"] == 3.0  # The loss's own figure, logged.
    assert l["loss"] < l["ce"]  # Focal down-weights easy examples: below cross-entropy.
  assert "focal" in losses.names()


def test_a_rule_from_outside_selects_on_a_checkpoint_and_over_records(run, tmp_path, capsys):
  workdir = run[0]
  out = str(tmp_path / "out")
  assert heads_main.main([f"--workdir={workdir}", "--layer=all", "--select=least_spurious",
                          "--out", out, "--no_progress"]) == 0
  result = json.load(open(os.path.join(out, "heads.json")))
  spurious = [h["alone"][result["roles"]["val_id"]]["spurious_accuracy"]
              for h in result["heads"]]
  best = result["heads"][int(np.argmin(spurious))]  # argmin keeps the first: the tie order
  assert result["rule"] == "least_spurious"
  assert (result["selection"]["layer"], result["selection"]["head"]) == (best["layer"],
                                                                        best["head"])
  mask = np.asarray(result["mask"])
  assert mask[best["layer"]].sum() == 1 and mask[best["layer"], best["head"]] == 1
  capsys.readouterr()
  assert heads_main.main(["--table", workdir, "--select=oracle,least_spurious"]) == 0
  assert "least_spurious: ID validation attribute labels" in capsys.readouterr().out


def test_registries_refuse_a_clash_and_name_the_registered(examples):
  with pytest.raises(errors.UserError, match="already registered"):
    regularizers.register(regularizers.RegularizerSpec(
        name="attention_entropy", fn=lambda ctx: ctx.attn.mean(),
        needs={regularizers.ATTENTION}))
  spec = examples.attention_entropy.SPEC
  assert regularizers.register(spec) is spec  # the same definition again (a reload): quiet
  with pytest.raises(errors.UserError, match="attention_entropy"):
    regularizers.get("nope")


def test_an_analysis_from_outside_reads_the_run(run, tmp_path, examples):
  workdir, logit_margin = run[0], examples.logit_margin
  logit_margin.define_flags()  # as its `__main__` does, then its flags as on the command line
  flags.FLAGS.unparse_flags()
  try:
    logit_margin.main(flags.FLAGS(["logit_margin", f"--workdir={workdir}",
                                   "--margin_split=val_ood", f"--out={tmp_path}"]))
  finally:
    flags.FLAGS.unparse_flags()
  result = json.load(open(tmp_path / "logit_margin.json"))
  loaded = rundir.load_run(workdir)  # the slow, obvious reference: one batch of all 64
  batch = next(runs.eval_batches(loaded, "val_ood", 64))
  logits = np.sort(np.asarray(loaded.model.apply(loaded.variables, batch["image"])[0]), -1)
  assert result["split"] == "val_ood" and result["step"] == 2
  np.testing.assert_allclose(result["margin"], np.mean(logits[:, -1] - logits[:, -2]),
                             rtol=1e-5)
