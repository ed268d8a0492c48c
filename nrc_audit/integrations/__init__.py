"""Training-loop integrations: ``integrations.lightning.NRCCallback`` and
``integrations.transformers.NRCTrainerCallback``. Each imports its framework; this package imports neither."""
