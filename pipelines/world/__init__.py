"""The synthetic world (``capfilt synth``): small images of simple objects with known ground truth.

No real web data can be downloaded in development or CI, so CapFilt is measured on a world whose facts we
know. Each image shows 1-3 objects (shape, colour, size) on a background, in one of three layouts:

- ``single``: one object at a position (left, right, top, bottom, center);
- ``pair``: two different objects, one ``left_of`` or ``above`` the other;
- ``group``: two or three identical objects (a count).

Captions are compositional, lower case, with several phrasings per fact (synonyms, word orders, which object
of a pair comes first), so a model has to look at the image to write or match them; the vocabulary is small
and regular so that :func:`parse_caption` reads any caption back into facts and
:func:`caption_attribute_accuracy` scores it, which is how the evaluation measures captioners and filters.

What ``<root>/world/`` holds (:func:`world_files` names the paths):

- ``images/{web,human,test}/NNNNNN.jpg``: the images (JPEG).
- ``web.parquet`` (``url``, ``caption``): the "web" corpus the pipeline ingests. Captions are noisy at
  ``world.noise_rate`` with ``world.noise_mix`` of types: ``unrelated`` (ads, "my favourite photo",
  file names), ``wrong_attribute`` (one fact changed), ``other_caption`` (another image's caption),
  ``partial`` (true but incomplete). URLs are ``{base}/web/NNNNNN.jpg``: ``{base}`` is a placeholder for
  the root URL of ``images/``, which only exists while :func:`serve_world` runs; ``capfilt ingest``
  starts the server and rewrites the placeholder to its live address. A placeholder (rather than a fixed
  host and port) keeps the world a plain directory that can be copied, moved to S3 and served again.
- ``human_train.json``, ``human_test.json``: the clean human-annotated training set and the held-out test
  set, in COCO-Karpathy JSON as BLIP reads it (train: one entry per caption,
  ``{"image", "caption": str, "image_id"}``; test: one entry per image, ``{"image", "caption": [..],
  "image_id"}``), image paths relative to ``images/``.
- ``truth/web.parquet`` (one row per web row: ``row``, ``image_id``, ``path``, ``facts`` as JSON,
  ``clean_caption``, ``caption``, ``noisy``, ``noise_type``, ``noise_detail``) and ``truth/images.parquet``
  (every image of every split with its facts). No pipeline stage reads ``truth/``; only evaluation does.
  Join ingested rows to the truth by the URL's path below ``images/`` (``web/NNNNNN.jpg`` == ``path``).
- ``manifest.json``: counts, settings and the measured noise mix; then ``_COMMITTED``.

Determinism: every image and its captions come from a generator seeded by ``(seed, split, index)``, so the
first N images of a world do not depend on how many are generated; the noise assignment is seeded by
``seed`` alone and is exact (``round(noise_rate * n_web)`` noisy rows, split by the mix with largest
remainders).

The modules: :mod:`.language` (vocabulary, facts, captions, the parser and attribute accuracy), :mod:`.images`
(pixels), :mod:`.noise` (the noise types, one registry), :mod:`.layout` (file names and the URL placeholder),
:mod:`.build` (``capfilt synth``), :mod:`.serve` (the HTTP server) and :mod:`.tasks` (downstream tasks drawn from
the world: ``capfilt synth-tasks``).
"""

from .build import SIZE_DEFAULTS, SPLITS, WorldExistsError, generate_world, resolve_counts, run_synth
from .images import draw_object, render_clip, render_image
from .language import (
    BACKGROUNDS,
    COLOURS,
    LAYOUTS,
    PLURALS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    caption_attribute_accuracy,
    distinct_captions,
    parse_caption,
    render_caption,
    sample_facts,
    seeded_rng,
)
from .layout import URL_PLACEHOLDER, WORLD_LAYOUT, resolve_urls, world_files
from .noise import NOISE_TYPES, NOISES, register_noise
from .serve import serve_directory, serve_world
from .tasks import single_facts, write_tasks

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "LAYOUTS",
    "NOISES",
    "NOISE_TYPES",
    "PLURALS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SIZE_DEFAULTS",
    "SPLITS",
    "URL_PLACEHOLDER",
    "WORLD_LAYOUT",
    "WorldExistsError",
    "caption_attribute_accuracy",
    "distinct_captions",
    "draw_object",
    "generate_world",
    "parse_caption",
    "register_noise",
    "render_caption",
    "render_clip",
    "render_image",
    "resolve_counts",
    "resolve_urls",
    "run_synth",
    "sample_facts",
    "seeded_rng",
    "serve_directory",
    "serve_world",
    "single_facts",
    "world_files",
    "write_tasks",
]
