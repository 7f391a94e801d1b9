"""The training engine: our own loop over a DeepSpeed engine, run in one process or by Ray Train."""
