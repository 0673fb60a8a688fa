"""Command-line tools that prepare and check webdataset shards.

- ``python -m data_tools.make_shards INPUT OUTPUT_DIR``: folders of images and captions to shards.
- ``python -m data_tools.inspect OUTPUT_DIR`` (alias ``data_tools.verify``): counts, caption and size
  statistics, and a check that every shard opens and every sample decodes.

This package depends on pillow, tqdm, braceexpand (a webdataset dependency) and the standard library only —
never on torch or the ``mmcontrast`` training stack — so it runs on a machine that only prepares data. It
writes and reads webdataset's tar layout with ``tarfile``: importing webdataset itself would import torch.
"""
