"""Prefect flows over the pipeline stages, and the ``capfilt`` command (``flows.cli``) above them.

Importing this package (or any module in it) changes nothing in ``os.environ``: the entry points set Ray's and
Prefect's environment when they start them (see ``flows.runtime``).
"""
