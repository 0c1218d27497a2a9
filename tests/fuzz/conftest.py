"""Hypothesis profiles for the fuzz tests (docs/fuzzing.md).

* ``ci`` (the default): a short run, so ``./run test`` stays fast; the whole
  directory takes well under a minute on two cores.
* ``long``: ``SPA_FUZZ_PROFILE=long python -m pytest tests/fuzz``; many
  examples per test, ten minutes or more in all. Run it before a release and
  after any change to a parser.

No deadline: timing varies with the machine (and with X25519 key set-up),
and a slow example is not a bug here; a crash is.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)

settings.register_profile("ci", max_examples=150, **_COMMON)
settings.register_profile("long", max_examples=7_500, **_COMMON)
settings.load_profile(os.environ.get("SPA_FUZZ_PROFILE", "ci"))
