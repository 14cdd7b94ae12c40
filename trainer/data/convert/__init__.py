"""Converters: official dataset files -> WebDataset shards + manifest.json (run once per dataset).

* ``shards``   — the shard writer every converter uses (parallel, resumable, atomic);
* ``dsprites`` — dSprites rendered procedurally (``linrep data dsprites``);
* ``dislib``   — the official DisLib files: dsprites, shapes3d, mpi3d, cars3d, smallnorb
  (``linrep data convert``), reading them through ``arrays`` (memmaps, npz members);
* ``imagenet`` — ImageNet-1k folder layouts (``linrep data imagenet``).

What each accepts and writes: docs/data-formats.md. Training never imports this package: it reads
the shards through ``trainer.data.shards``, ``trainer.data.stream`` and ``trainer.data.labels``.
Kept import-light like ``trainer.data`` (shard-writer processes import these modules).
"""
