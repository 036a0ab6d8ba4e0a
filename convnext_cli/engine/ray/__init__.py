"""``--engine ray``: labelling on a Ray cluster, the shard as the unit of work.

- :mod:`~convnext_cli.engine.ray.settings`: what a run is made of (settings, actor plan);
- :mod:`~convnext_cli.engine.ray.session`: Ray's life cycle (a private local Ray, or the
  user's cluster);
- :mod:`~convnext_cli.engine.ray.units`: the units the driver lists (shards, row groups,
  chunks of files), never their members;
- :mod:`~convnext_cli.engine.ray.datasource`: the read stage, a unit -> rows in the cluster;
- :mod:`~convnext_cli.engine.ray.stages`: decode tasks and the model actors;
- :mod:`~convnext_cli.engine.ray.parts`: ``-o DIR``: one part and one status per unit;
- :mod:`~convnext_cli.engine.ray.run`: the driver.

Importing any of them never imports Ray.
"""
