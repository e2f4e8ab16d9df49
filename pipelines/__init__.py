"""capfilt's stages: plain functions over a typed config and fsspec URLs, using Ray for distributed work.

Importing this package changes nothing in ``os.environ``: Ray's environment is set where Ray starts
(``pipelines.ray_runtime.ensure_ray``, and the entry points in ``flows``).
"""
