"""The `medmtl` command's verbs, one module each (train, evaluate, predict, compare),
and what they share: building datasets and models from a config (build),
reloading a trained model (from_checkpoint), metric tables (tables)."""
