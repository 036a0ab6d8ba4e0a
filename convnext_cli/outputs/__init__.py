"""Where records go: the writers (text, table, matrix, Parquet, HTML), output files, names,
resume."""
