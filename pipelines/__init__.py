"""capfilt's stages: plain functions over a typed config and fsspec URLs, using Ray for distributed work."""
from .ray_runtime import configure_environment as _configure_ray_environment

_configure_ray_environment()
