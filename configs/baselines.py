r"""Head selection beside the spurious-correlation baselines: ERM, DIV, GroupDRO and JTT on one
backbone and one dataset, every run evaluated on every split with group metrics, so that
`python -m vitreg_jax.reports` prints them in one table with DFR and +SEL (README,
"Head selection beside GroupDRO, JTT and DFR").

  # ERM, DIV, GroupDRO (dominoes, no download; ~2-3 CPU minutes each)
  python -m vitreg_jax.main --config=configs/baselines.py:method=erm --workdir=runs/bl/erm_s0
  python -m vitreg_jax.main --config=configs/baselines.py:method=div --workdir=runs/bl/div_s0
  python -m vitreg_jax.main --config=configs/baselines.py:method=group_dro \
      --workdir=runs/bl/group_dro_s0
  # JTT: one config, two stages; the second reads the first's workdir
  python -m vitreg_jax.main --config=configs/baselines.py:method=jtt,stage=identify \
      --workdir=runs/bl/jtt_id_s0
  python -m vitreg_jax.main \
      --config=configs/baselines.py:method=jtt,stage=upweight,identification=runs/bl/jtt_id_s0 \
      --workdir=runs/bl/jtt_s0
  # Waterbirds (prepared data, a pretrained ViT): add data=waterbirds,init=/ckpt/ViT-B_16.npz

Arguments (`:key=value,...`):
  method          'erm' | 'div' | 'group_dro' | 'jtt'.
  data            'dominoes' (default; the quickstart ViT and recipe, configs/quickstart.py) |
                  'waterbirds' (configs/waterbirds.py's fine-tuning recipe; `init`, `variant`,
                  `epochs`, `lr` as there).
  seed            run seed.
  steps           training steps on dominoes (600, the quickstart's).
  step_size       GroupDRO's eta (0.01, the authors' `--robust_step_size` default).
  adjustment      GroupDRO's generalization adjustment C (0: none; the authors tune it in
                  {0, 1, 2, 3, 4, 5} on validation worst-group accuracy).
  stage           JTT: 'identify' (ERM for the identification steps / epochs, then stop) or
                  'upweight' (retrain from the same initialization on the train split with the
                  identification model's errors upsampled per epoch, see `copies`).
  identification  JTT stage 'upweight': the workdir of stage 'identify'. Its error set is
                  written there (`jtt_error_set.json`, `python -m vitreg_jax.jtt`) when
                  missing.
  id_step         JTT stage 'upweight': identify with this checkpoint of the
                  `identification` run instead of its last (e.g. an ERM run of this config
                  at step T: no separate stage 'identify' run; its error set is
                  `jtt_error_set_step<T>.json`). 0: the last checkpoint.
  lambda_up       JTT's upsampling factor lambda_up (dominoes 5, our choice; Waterbirds 100,
                  Liu et al. 2021, App. B), in the authors' meaning by default (`copies`).
  copies          'authors' (default): each error appears lambda_up + 1 times per epoch, as
                  the authors' `run_expt.py` (`main`) concatenates the training set with
                  lambda_up copies of the error set | 'lambda': lambda_up times (this
                  config's meaning before; dominoes' lambda_up=5 here = the 6 copies of the
                  earlier README runs). `data.upsample['copies']`, vitreg_jax/data/groups.py.
  id_steps        JTT's identification length T on dominoes (150 steps, ~1 epoch; our choice).
  id_epochs       ... on Waterbirds (2 epochs of the 30-epoch fine-tuning; our choice: Liu et al.
                  use 60 of 300 epochs training a ResNet-50 with other hyper-parameters).
  runlocal        a 30-step smoke run (dominoes) / the Waterbirds runlocal model.

GroupDRO trains on group-balanced batches (`data.sampler='group_balanced'`), as the authors'
commands do (`--reweight_groups --robust`). Choose C, lambda_up and T on the validation
splits' worst-group accuracy, never on test.
"""

import os

from vitreg_jax import config_lib

METHODS = ("erm", "div", "group_dro", "jtt")
STAGES = ("identify", "upweight")
ERROR_SET_FILE = "jtt_error_set.json"  # vitreg_jax.baselines.jtt.ERROR_SET_FILE
UPSAMPLE_COPIES = ("authors", "lambda")  # vitreg_jax.data.groups.UPSAMPLE_COPIES


def _base(arg):
  here = os.path.dirname(os.path.abspath(__file__))
  reg = "div" if arg.method == "div" else "erm"
  if arg.data == "dominoes":
    config = config_lib.import_config(os.path.join(here, "quickstart.py")).get_config(
        f"reg={reg},steps={arg.steps},runlocal={arg.runlocal}")
    config.data.eval_splits = ("val_id", "val_ood", "test_id", "test_ood")
    config.eval_every_steps = max(config.total_steps // 3, 1)  # checkpoint selection points
    config.checkpoint_every_steps = config.eval_every_steps
    config.keep_checkpoints = 10  # JTT may identify with an earlier checkpoint (id_step)
    return config
  if arg.data == "waterbirds":
    return config_lib.import_config(os.path.join(here, "waterbirds.py")).get_config(
        f"reg={reg},init={arg.init},variant={arg.variant},epochs={arg.epochs},lr={arg.lr},"
        f"runlocal={arg.runlocal}")
  raise ValueError(f"data must be 'dominoes' or 'waterbirds', got {arg.data!r}.")


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, method="erm", data="dominoes", seed=0, step_size=0.01, adjustment=0.0,
      stage="", identification="", id_step=0, lambda_up=-1, copies="authors", id_steps=150,
      steps=600, id_epochs=2.0, init="",
      variant="B/16", epochs=30, lr=1e-3, runlocal=False)
  if arg.method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {arg.method!r}.")
  config = _base(arg)
  config.seed = arg.seed
  if arg.method == "group_dro":
    config.loss = dict(name="group_dro", step_size=arg.step_size,
                       generalization_adjustment=arg.adjustment)
    config.data.sampler = "group_balanced"
  if arg.method == "jtt":
    _jtt(config, arg)
  elif arg.stage or arg.identification:
    raise ValueError("stage= and identification= are JTT's arguments: add method=jtt.")
  return config


def _jtt(config, arg):
  """Stage 'identify': ERM cut at T. Stage 'upweight': ERM on the upsampled error set."""
  if arg.stage not in STAGES:
    raise ValueError(f"method=jtt needs stage=identify or stage=upweight (got {arg.stage!r}).")
  if arg.stage == "identify":
    if arg.identification:
      raise ValueError("identification= belongs to stage=upweight.")
    if arg.runlocal:
      return
    if arg.data == "dominoes":
      config.total_steps = arg.id_steps
    else:
      config.total_epochs = float(arg.id_epochs)
      # The same schedule compressed to T: warmup keeps its share of the full run's epochs
      # (2 of 30), so a 2-epoch identification still warms up and decays.
      warmup = config.schedule.warmup_epochs * arg.id_epochs / arg.epochs
      config.schedule = dict(config.schedule.to_dict(), warmup_epochs=warmup)
    return
  if not arg.identification:
    raise ValueError("JTT stage=upweight needs identification=WORKDIR (the stage=identify run).")
  lambda_up = arg.lambda_up if arg.lambda_up > 0 else (5 if arg.data == "dominoes" else 100)
  if arg.copies not in UPSAMPLE_COPIES:
    raise ValueError(f"copies must be one of {UPSAMPLE_COPIES}, got {arg.copies!r}.")
  config.data.sampler = "upsample"
  name = ERROR_SET_FILE.replace(".json", f"_step{arg.id_step}.json") if arg.id_step \
      else ERROR_SET_FILE
  config.data.upsample = dict(file=os.path.join(arg.identification, name), factor=lambda_up,
                              copies=arg.copies)
  if arg.id_step:
    config.data.upsample["step"] = arg.id_step
