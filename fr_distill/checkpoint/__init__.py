"""Training checkpoints on disk: the single-file format with its checksum and the store of a
run's checkpoints (keep-last, resume; :mod:`.files`), the sharded DCP directory format
(:mod:`.sharded`), and the conversion between a run's objective and optimizer and a
checkpoint's tensors (:mod:`.state`)."""
