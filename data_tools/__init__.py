"""Command-line tools that prepare and check webdataset shards.

- ``python -m data_tools.make_shards INPUT OUTPUT_DIR``: folders of images and captions (or images alone,
  ``--layout images``) to shards.
- ``python -m data_tools.inspect OUTPUT_DIR`` (alias ``data_tools.verify``): counts, caption and size
  statistics, and a check that every shard opens and every sample decodes.

make_shards' pieces, one concern each: ``inputs`` (finding the samples, streamed in sorted order),
``shuffle`` (the seeded order that spreads them over the shards), ``manifest`` (the listing saved in
OUTPUT_DIR), ``samples`` (checking and encoding one input), ``output``
(writing one shard; which files in OUTPUT_DIR are ours), ``engines`` (the local pool or Ray). ``formats``
holds the names every tool shares.

This package depends on pillow, tqdm, braceexpand (a webdataset dependency) and the standard library only
(Ray, optionally, for ``make_shards --engine ray``, imported only there) —
never on torch or the ``mmcontrast`` training stack — so it runs on a machine that only prepares data. It
writes and reads webdataset's tar layout with ``tarfile``: importing webdataset itself would import torch.
"""
