"""Prefect tasks over storage/ and dumo_model/, and what composes the two where neither may know the other.

Which module is which (a newcomer's map; tests/test_layout_rules.py keeps the import direction):
- a stage's Prefect tasks, each a few lines over the code beside it or below: ``encode`` (build-latents),
  ``train`` (launch and follow the rank processes), ``train_nodes``, ``evaluate`` (its tasks close the
  module; above them the protocol and the one evaluation: sampling and scoring), ``compare``,
  ``pipeline`` (where the data is, the run's summary);
- no Prefect, once per dataset: ``reference`` (real images, feature extractor and its statistics, which
  every evaluation scores against);
- no Prefect, run inside each DeepSpeed rank process: ``ranks/`` (``python -m tasks.ranks``);
- no Prefect, one process: ``sample`` and ``export`` (``dumo sample`` / ``dumo export``), ``modeling`` (the
  network of a run, and the check that a run can continue from a checkpoint);
- shared: ``config`` and ``config_files`` (the typed config and its presets), ``eval_record`` (what an
  evaluation measured, as metrics.json holds it), ``run_context`` (am I inside a
  Prefect run?), ``progress``, ``retry``, ``artifacts``;
- the front door's helpers: ``cli_support`` (what the CLI asks of storage and the model, so that flows/
  imports only flows and tasks), ``local_server`` and ``zombies`` (``make serve``).
"""
