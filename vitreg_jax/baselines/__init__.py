"""The field's spurious-correlation baselines beside head selection: GroupDRO (a training
objective, `group_dro.py`), JTT (`jtt.py`: stage 1's error set, upsampled in stage 2) and DFR
(`dfr.py`: the last layer retrained on group-balanced validation features).

Commands: `python -m vitreg_jax.jtt`, `python -m vitreg_jax.dfr`; GroupDRO is
`config.loss.name='group_dro'`. Docstring only.
"""
