"""From command-line INPUTS to an ordered stream of inputs: files, folders, globs, tar and
Parquet."""
