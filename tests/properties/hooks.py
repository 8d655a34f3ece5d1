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


SCOPES = ("admin", "runs", "ingest")


@schemathesis.hook
def filter_case(ctx, case):
    # `POST /v1/tokens`: `project_id` is required with the `ingest` scope and
    # refused without it, a rule between two fields that OpenAPI 3.0 cannot
    # state (the schema's description does). A body otherwise valid that
    # breaks it would be reported as a valid request refused, so such bodies
    # are not sent; tests/suite/tenancy/tokens.rs covers the rule's 422s.
    if case.operation.method.upper() != "POST" or case.operation.path != "/v1/tokens":
        return True
    body = case.body
    if not isinstance(body, dict):
        return True
    scopes = body.get("scopes")
    if not isinstance(scopes, list) or not all(scope in SCOPES for scope in scopes):
        return True
    return ("ingest" in scopes) == isinstance(body.get("project_id"), str)
