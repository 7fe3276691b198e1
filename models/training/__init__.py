"""The training machinery: config, trainer, loops, data, strategies, reporting, torchrun; never loaded by serving."""
