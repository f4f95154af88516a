"""The Ray Data loader (`data.loader: ray_data`): for data that outgrows the driver.

Files (local or `s3://`, one file or a folder of them) are read in Ray tasks, in parts (`parts`, `read`); rows are
checked and split in `map_batches` tasks, all of them before training (`check`: a bad row is an error before any
Train worker starts, and the steps come from the counted rows); the held-out rows and the first training rows are
tokenized for the report's figures, the rest as the Train workers read them (`tokenize`, `prepare`). The driver keeps
only what the report needs: counts, the first bad rows, and token-length histograms. Each Ray Train worker streams
its shard of the training rows (`ray.train.get_dataset_shard`).

The same row functions as the driver loader (`jobs.data.readers`, `examples`, `encoding`) read, check and tokenize,
so a row gets the same tokens either way. The split differs: a row is held out when a seeded hash of its file and row
number falls under `data.validation_fraction`, which needs no count or shuffle of the whole data; the evaluation stage
reads the held-out rows the same way (`prepare.validation_examples`).
"""
