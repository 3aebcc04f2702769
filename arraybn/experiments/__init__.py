"""Experiment tooling on top of the stages: sweeps of many runs, reports and plots.

``sweep_config`` reads a sweep's TOML file, ``sweep`` runs what is left of it, ``report``
collects finished runs into tables and ``plots`` draws them. Nothing here is a stage: each run
is made by ``arraybn.stages.run_pipeline``.
"""
