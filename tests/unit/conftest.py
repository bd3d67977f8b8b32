"""Hypothesis profiles for the unit tests.

``ci`` (the default): derandomized, so every run of the suite tries the same examples and CI
cannot turn red by chance; no per-example deadline (Hypothesis's 200 ms default failed
test_parsers_only_raise_invalid_field[ModeSelect] on a loaded machine: timing is the
benchmarks' business, not the tests'). ``explore``: random examples, more of them, for hunting bugs by hand
(``pytest tests/unit --hypothesis-profile=explore``); a failure it finds gets a deterministic
regression test (as test_dedup_model's short-last-chunk test came from one).
"""

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True, deadline=None)
settings.register_profile("explore", derandomize=False, max_examples=1000)
settings.load_profile("ci")
