"""`python -m vitreg_jax.import_weights`: pretrained weights as a run directory the analyses,
`heads` and the report open (`training/imported.py`).

An ImageNet-pretrained timm ViT-Ti or ResNet-50 (what the "How do ViTs work?" notebooks
analyse), its state_dict exported by `tools/convert_timm.py`:

  python -m vitreg_jax.import_weights --timm=vit_ti --weights=/ckpt/vit_ti.npz \
      --data=/data/imagenet --workdir=/runs/vit_ti_in1k
  python -m vitreg_jax.analysis.fourier --workdir=/runs/vit_ti_in1k

Any weights a config's `init_from` names, e.g. the head-diversity authors' checkpoints
(`tools/convert_diverse_vit.py`) with their model and input scaling:

  python -m vitreg_jax.import_weights --workdir=/runs/div_authors \
      --config=configs/mnist_cifar.py:reg=div,init=/ckpt/ckpt_diverse_ep34.npz
  python -m vitreg_jax.heads --workdir=/runs/div_authors --select

With `--config` the config names the model (it must match the file), the data the analyses
read and the weights; `--config.x=...` overrides work as for `main`. The converters run in the
separate PyTorch virtualenv (`bench/make_torch_venv.sh`). A mistake is one line on stderr and
exit status 1, before anything is written.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from vitreg_jax import config_lib
from vitreg_jax import errors
from vitreg_jax.training import imported

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined when it runs (its `__main__`), not at import."""
  config_flags.DEFINE_config_file(
      "config", None, "Config file (model, data, init_from), optionally with ':arg'.",
      lock_config=True)
  FLAGS["config"].parser = config_lib.ConfigFileParser()
  flags.DEFINE_string("workdir", None, "The new run directory to write.")
  flags.DEFINE_enum("timm", None, sorted(imported.TIMM_MODELS),
                    "Instead of --config: a timm ImageNet model (training/imported.py).")
  flags.DEFINE_string("weights", None, "--timm: its state_dict (.npz / .safetensors).")
  flags.DEFINE_string("data", None, "--timm: the ImageNet folder <data>/<split>/<class>/.")
  flags.DEFINE_string("train_split", "train",
                      "--timm: the split of the Hessian / landscape batches.")
  flags.DEFINE_string("eval_split", "val", "--timm: the split the analyses read.")
  flags.DEFINE_bool("prepare_data", False,
                    "Prepare config.data first if it is not (as main's flag).")
  flags.mark_flag_as_required("workdir")


def config_from_flags():
  """The import config: `--config`, or `--timm` with `--weights` and `--data`."""
  if (FLAGS.config is None) == (FLAGS.timm is None):
    raise errors.UserError("Pass either --config=FILE (with init_from) or --timm=MODEL "
                           f"(one of {sorted(imported.TIMM_MODELS)}) with --weights and --data.")
  if FLAGS.config is not None:
    return FLAGS.config
  if not FLAGS.weights or not FLAGS.data:
    raise errors.UserError("--timm needs --weights=FILE (tools/convert_timm.py writes it) and "
                           "--data=FOLDER (ImageNet as <data>/<split>/<class>/<image>).")
  return imported.timm_config(FLAGS.timm, FLAGS.weights, FLAGS.data,
                              train_split=FLAGS.train_split, eval_split=FLAGS.eval_split)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with errors.exit_on_user_error("FATAL"):
    workdir = imported.write_run(config_from_flags(), FLAGS.workdir,
                                 prepare_data=FLAGS.prepare_data)
  print(f"wrote {workdir} (config.json, checkpoint step {imported.STEP}): pass it as --workdir "
        "to the analyses, heads and reports")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
