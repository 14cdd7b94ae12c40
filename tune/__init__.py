"""Sweeps: a spec -> Ray Tune -> many trainer runs with probes -> summary tables and plots.

    linrep sweep SPEC [key=value ...] [--address A] [--name N]
    linrep reproduce synthetic [--quick] [--budget B] [--seeds K] [--address A]

Modules:
  spec        the YAML spec (search space, seeds, metric, scheduler, resources), validated against
              the config tree before Ray starts, expanded into a deterministic plan of trials;
              the first-class axes `classes` (|C| / K) and `kappa`, `beta`, `learn_beta` (temperature)
  sweep       the Tune driver: parent/child MLflow runs, trials = Ray Train runs + probe actors,
              concurrency from the cluster, resume by rerunning the same command
  summary     mean ± std over seeds per configuration: CSV, markdown, PNG plots on the parent run
  folder      the sweep folder: state and plan files, trial ledgers (atomic writes, trainer.files)
  reproduce   the paper's synthetic ablations (docs/science.md, synthetic experiments) and its table
MLflow is reached through trainer.tracking only.
Documented example specs live in tune/specs/ (ci-grid.yaml, classes-temperature.yaml).
"""
