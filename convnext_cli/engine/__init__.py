"""Running the model over inputs: batching, decode workers, threads, loading, device, Ray.

Nothing is imported here: each module is imported where it is used."""
