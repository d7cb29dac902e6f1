"""Process groups, the parallel layout and the collectives that tensor and pipeline parallelism use.

Imports only torch and ``topologies``; never ``engine`` or ``server``.
"""
