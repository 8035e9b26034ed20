"""Analyses of "How do Vision Transformers work?" (Park & Kim, ICLR 2022) over any run.

- `hessian`: Hessian eigenvalue spectra (power iteration with deflation, Lanczos, stochastic
  Lanczos quadrature, Hutchinson trace) of NLL + L2 weight penalty.
- `fourier`: relative log amplitudes of Fourier-transformed feature maps per (sub-)block.
- `noise`: accuracy drop under frequency-band-limited noise; mean corruption accuracy.

Each module is a set of pure functions of `(model, variables, batch)` plus a small `main`
(`python -m vitreg_jax.analysis.<name> --workdir=DIR`); `runs` is the shared command-line
plumbing (workdirs, checkpoints, batches, progress, JSON and PNG output). See docs/analysis.md.
"""
