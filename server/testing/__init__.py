"""Helpers that the tests and the benchmarks share, never imported by the runtime: servers started
by ``./launch.sh`` on loopback (``processes``) and emulated clusters under load (``cluster``).
They need a checkout (``launch.sh``) and the test or bench extras (``openai``, ``psutil``)."""
