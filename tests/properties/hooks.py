"""Schemathesis hooks for tests/suite/properties.rs.

A reused Idempotency-Key with a different request is refused with 422 by
design (the IETF Idempotency-Key draft's answer), which a generator that
draws keys from a small space would report as a valid request rejected.
Each generated request therefore gets a fresh key; the suite's own tests
cover replays and mismatches.
"""

import uuid

import schemathesis


@schemathesis.hook
def before_call(ctx, case, kwargs):
    # Every phase (examples, coverage, fuzzing, stateful) sends through here.
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = str(uuid.uuid4())
