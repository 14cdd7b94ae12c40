"""Datasets: the synthetic DGP, WebDataset shards, DisLib generators/converters, ImageNet.

Kept import-light (no torch here): shard-writer processes import trainer.data.* by the thousand.
Training sources live in trainer.data.sources.
"""
