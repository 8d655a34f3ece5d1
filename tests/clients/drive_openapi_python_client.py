"""Drives runs through the client openapi-python-client generated from runq's
spec, and prints what it saw as one JSON object for tests/suite/clients.rs.

Usage: drive_openapi_python_client.py CLIENT_DIR BASE_URL TOKEN

CLIENT_DIR holds the generated package `runq_opc`. The script only reports;
the Rust test asserts. It exits non-zero if the client cannot parse an answer.
"""

import json
import sys
import time
import uuid

GREETING = "héllo 🚀"
TERMINAL = {"succeeded", "failed", "stopped_quota", "cancelled"}


def main() -> None:
    client_dir, base_url, token = sys.argv[1:4]
    sys.path.insert(0, client_dir)
    from runq_opc import AuthenticatedClient
    from runq_opc.api.runs import (
        create_run,
        create_runs,
        get_run,
        list_run_events,
        list_runs,
        retry_runs,
    )
    from runq_opc.models import (
        CreatedRuns,
        CreateRun,
        CreateRuns,
        EventPage,
        NewStep,
        Problem,
        RetriedRuns,
        RetryableStatus,
        RetryRuns,
        Run,
        RunDetail,
        RunPage,
    )

    client = AuthenticatedClient(base_url=base_url, token=token, raise_on_unexpected_status=True)

    def parsed(response, kind):
        assert isinstance(response.parsed, kind), (response.status_code, response.content)
        return response.parsed

    def wait(run_id):
        deadline = time.monotonic() + 30
        while True:
            detail = parsed(get_run.sync_detailed(run_id, client=client), RunDetail)
            if detail.status.value in TERMINAL or time.monotonic() > deadline:
                return detail
            time.sleep(0.02)

    body = CreateRun(
        steps=[
            NewStep(name="greet", kind="echo", input_={"greeting": GREETING}),
            NewStep(name="count", kind="count"),
        ],
        metadata={"client": "openapi-python-client"},
    )
    key = str(uuid.uuid4())
    first = create_run.sync_detailed(client=client, body=body, idempotency_key=key)
    run = parsed(first, Run)
    again = create_run.sync_detailed(client=client, body=body, idempotency_key=key)
    detail = wait(run.id)
    page = parsed(list_runs.sync_detailed(client=client, limit=10), RunPage)
    events = parsed(list_run_events.sync_detailed(run.id, client=client), EventPage)

    failing = CreateRun(steps=[NewStep(name="boom", kind="fail", input_={"message": "no"})], max_attempts=1)
    batch = create_runs.sync_detailed(client=client, body=CreateRuns(runs=[failing]))
    failed = wait(parsed(batch, CreatedRuns).runs[0].id)
    retried = parsed(retry_runs.sync_detailed(client=client, body=RetryRuns(status=RetryableStatus.FAILED)), RetriedRuns)

    missing = get_run.sync_detailed(uuid.uuid4(), client=client)
    invalid = create_run.sync_detailed(client=client, body=CreateRun(steps=[NewStep(name="x", kind="teleport")]))

    print(
        json.dumps(
            {
                "created": first.status_code,
                "repeated": again.status_code,
                "same_run": parsed(again, Run).id == run.id,
                "status": detail.status.value,
                "steps": [[step.name, step.status.value] for step in detail.steps],
                "greeting": detail.result["prev"]["greeting"],
                "listed": run.id in [listed.id for listed in page.runs],
                "next_cursor": page.next_cursor,
                "events": [event.kind for event in events.events],
                "batch": batch.status_code,
                "failed": failed.status.value,
                "retried": retried.ids == [failed.id],
                "not_found": [missing.status_code, parsed(missing, Problem).type_],
                "invalid": [invalid.status_code, parsed(invalid, Problem).detail],
            }
        )
    )


if __name__ == "__main__":
    main()
