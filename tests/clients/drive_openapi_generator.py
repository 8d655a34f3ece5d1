"""Drives runs through the client openapi-generator (`-g python`) generated
from runq's spec, and prints what it saw as one JSON object for
tests/suite/clients.rs.

Usage: drive_openapi_generator.py CLIENT_DIR BASE_URL TOKEN

CLIENT_DIR holds the generated package `runq_ogc`. The script only reports;
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
    import runq_ogc
    from runq_ogc.api.runs_api import RunsApi
    from runq_ogc.exceptions import ApiException
    from runq_ogc.models import CreateRun, CreateRuns, NewStep, Problem, RetryableStatus, RetryRuns

    configuration = runq_ogc.Configuration(host=base_url, access_token=token)
    with runq_ogc.ApiClient(configuration) as api_client:
        api = RunsApi(api_client)

        def wait(run_id):
            deadline = time.monotonic() + 30
            while True:
                detail = api.get_run(run_id)
                if detail.status.value in TERMINAL or time.monotonic() > deadline:
                    return detail
                time.sleep(0.02)

        def problem(call):
            try:
                call()
            except ApiException as error:
                return error.status, Problem.from_json(error.body)
            raise AssertionError("expected a problem")

        body = CreateRun(
            steps=[
                NewStep(name="greet", kind="echo", input={"greeting": GREETING}),
                NewStep(name="count", kind="count"),
            ],
            metadata={"client": "openapi-generator"},
        )
        key = str(uuid.uuid4())
        first = api.create_run_with_http_info(body, idempotency_key=key)
        run = first.data
        again = api.create_run_with_http_info(body, idempotency_key=key)
        detail = wait(run.id)
        page = api.list_runs(limit=10)
        events = api.list_run_events(run.id)

        failing = CreateRun(steps=[NewStep(name="boom", kind="fail", input={"message": "no"})], max_attempts=1)
        batch = api.create_runs_with_http_info(CreateRuns(runs=[failing]))
        failed = wait(batch.data.runs[0].id)
        retried = api.retry_runs(RetryRuns(status=RetryableStatus.FAILED))

        missing_status, missing = problem(lambda: api.get_run(uuid.uuid4()))
        invalid_status, invalid = problem(
            lambda: api.create_run(CreateRun(steps=[NewStep(name="x", kind="teleport")]))
        )

        print(
            json.dumps(
                {
                    "created": first.status_code,
                    "repeated": again.status_code,
                    "same_run": again.data.id == run.id,
                    "status": detail.status.value,
                    "steps": [[step.name, step.status.value] for step in detail.steps],
                    "greeting": detail.result["prev"]["greeting"],
                    "listed": run.id in [listed.id for listed in page.runs],
                    "next_cursor": page.next_cursor,
                    "events": [event.kind for event in events.events],
                    "batch": batch.status_code,
                    "failed": failed.status.value,
                    "retried": retried.ids == [failed.id],
                    "not_found": [missing_status, missing.type],
                    "invalid": [invalid_status, invalid.detail],
                }
            )
        )


if __name__ == "__main__":
    main()
