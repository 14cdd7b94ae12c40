"""Datasets at training time: the synthetic DGP, and readers of WebDataset shards + manifest.

The converters that write shards (DisLib files, procedural dSprites, ImageNet folders) live in
``trainer.data.convert``. Kept import-light (no torch here): shard-writer processes import
trainer.data.* by the thousand. Training sources live in trainer.data.sources.
"""
