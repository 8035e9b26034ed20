r"""MSA build-up ablation ("How do ViTs work?", Fig. 12a): AlterNet with MSAs added one by one.

Fig. 12a: "We replace Convs of ResNet with MSAs one by one according to the build-up rules. c1
to c4 stands for the stages. Several MSAs in c3 harm the accuracy, but the MSA at the end of
c2 improves it." The slides do not list every intermediate model; this sweep follows the
build-up rule of `vitreg_jax/models/alternet.py` (MSAs from the end of the last stage,
alternating, then the end of the earlier stages) from the pre-activation ResNet (no MSA) to
Alter-ResNet-50 (0, 1, 3, 2):

  0000 -> 0001 -> 0002 -> 0012 -> 0022 -> 0032 -> 0132

Everything else is configs/how_vits_work.py:model=alternet (CIFAR-100, its recipe).

  python -m vitreg_jax.sweep configs/msa_buildup.py --workdir=/runs/msa_buildup --slurm \
      --sbatch_args='--gpus=1'
  python -m vitreg_jax.sweep configs/msa_buildup.py:runlocal --workdir=/tmp/msa --local
  python -m vitreg_jax.reports /runs/msa_buildup

Arguments of get_config (`:key=value,...`): `msa` (one digit per stage, MSAs in that stage,
e.g. 0012), `dataset`, `seed`, `runlocal` (the small AlterNet of how_vits_work's runlocal,
blocks (1, 2, 2, 2), so at most one MSA per stage from c2 on). get_sweep takes `seeds` (how
many) and `runlocal`.
"""

import os

from vitreg_jax import config_lib

BUILDUP = ("0000", "0001", "0002", "0012", "0022", "0032", "0132")


def _how_vits_work():
  return config_lib.import_config(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "how_vits_work.py"))


def _blocks(config):
  return tuple(config.model.get("blocks_per_stage", (3, 4, 6, 4)))


def get_config(arg=None):
  """AlterNet of how_vits_work with `msa` MSAs per stage (argument string `arg`)."""
  arg = config_lib.parse_arg(arg, msa="0132", dataset="cifar100", seed=0, runlocal=False)
  config = _how_vits_work().get_config(
      f"model=alternet,dataset={arg.dataset},seed={arg.seed}"
      + (",runlocal" if arg.runlocal else ""))
  blocks = _blocks(config)
  if len(arg.msa) != len(blocks) or not arg.msa.isdigit():
    raise ValueError(f"msa must give one digit per stage ({len(blocks)} stages), e.g. 0012; "
                     f"got {arg.msa!r}.")
  msa = tuple(int(c) for c in arg.msa)
  too_many = [s + 1 for s, (m, n) in enumerate(zip(msa, blocks)) if m > n // 2]
  if too_many:
    raise ValueError(f"msa={arg.msa}: stage(s) {too_many} of blocks {blocks} hold at most "
                     f"{[n // 2 for n in blocks]} alternating MSAs.")
  config.model = dict(config.model.to_dict(), msa_per_stage=msa)
  return config


def get_sweep(arg=None):
  """The build-up sequence (capped by the stage sizes under runlocal) x seeds."""
  arg = config_lib.parse_arg(arg, seeds=1, runlocal=False)
  blocks = _blocks(_how_vits_work().get_config(
      "model=alternet" + (",runlocal" if arg.runlocal else "")))
  steps = []
  for msa in BUILDUP:
    capped = "".join(str(min(int(c), n // 2)) for c, n in zip(msa, blocks))
    if capped not in steps:
      steps.append(capped)
  points = [dict(msa=m, seed=s) for m in steps for s in range(arg.seeds)]
  if arg.runlocal:
    points = [dict(p, runlocal=True) for p in points]
  return points
