//! The published OpenAPI bounds are the bounds the server enforces.

use super::*;

/// One request a bound is probed with.
enum Probe {
    Post(&'static str, Value),
    Get(String),
    Keyed(String),
}

/// Every bound the spec states on a request is the server's: a value at each
/// bound is accepted and one step past it is refused (422 in a body, 400 in
/// a parameter), so what a generated client checks before sending is exactly
/// what the server checks.
#[tokio::test]
async fn spec_bounds_are_the_server_bounds() {
    let f = Fixture::new().await;
    let long_kind = "k".repeat(runq_shared::MAX_NAME_LEN);
    let mut config = TestApi::config();
    // Kinds at both length bounds are registered, so only length can refuse.
    config.step_kinds.extend(["k".to_owned(), long_kind]);
    let api = TestApi::start(f.db.pool.clone(), config);
    let run: Run = f.create_run().await;
    let spec: Value = serde_json::from_str(&runq_api::spec()).expect("spec parses");
    let schema =
        |name: &str, field: &str| spec["components"]["schemas"][name]["properties"][field].clone();
    let parameter = |path: &str, method: &str, name: &str| {
        spec["paths"][path][method]["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .map(|p| p["schema"].clone())
            .unwrap_or_else(|| panic!("{method} {path} has a parameter {name}"))
    };
    let step = json!({ "name": "x", "kind": "echo" });
    let run_with = |field: &'static str| {
        let step = step.clone();
        move |value: Value| {
            let mut body = json!({ "steps": [step.clone()] });
            body[field] = value;
            Probe::Post("/v1/runs", body)
        }
    };
    let step_with = |field: &'static str| {
        let step = step.clone();
        move |value: Value| {
            let mut step = step.clone();
            step[field] = value;
            Probe::Post("/v1/runs", json!({ "steps": [step] }))
        }
    };
    let text = |n: i64| json!("q".repeat(usize::try_from(n).unwrap_or(0)));
    let kinds = |n: i64| json!("k".repeat(usize::try_from(n).unwrap_or(0)));
    let many = |item: Value, n: i64| json!(vec![item; usize::try_from(n).unwrap_or(0)]);
    type Make<'a> = Box<dyn Fn(i64) -> Probe + 'a>;
    let cases: Vec<(&str, Value, Make<'_>)> = vec![
        (
            "priority",
            schema("CreateRun", "priority"),
            Box::new(move |n| run_with("priority")(json!(n))),
        ),
        (
            "max_attempts",
            schema("CreateRun", "max_attempts"),
            Box::new(move |n| run_with("max_attempts")(json!(n))),
        ),
        (
            "timeout_seconds",
            schema("CreateRun", "timeout_seconds"),
            Box::new(move |n| run_with("timeout_seconds")(json!(n))),
        ),
        (
            "queue",
            schema("CreateRun", "queue"),
            Box::new(move |n| run_with("queue")(text(n))),
        ),
        ("steps", schema("CreateRun", "steps"), {
            let step = step.clone();
            Box::new(move |n| Probe::Post("/v1/runs", json!({ "steps": many(step.clone(), n) })))
        }),
        (
            "steps[0].name",
            schema("NewStep", "name"),
            Box::new(move |n| step_with("name")(text(n))),
        ),
        (
            "steps[0].kind",
            schema("NewStep", "kind"),
            Box::new(move |n| step_with("kind")(kinds(n))),
        ),
        (
            "steps[0].timeout_seconds",
            schema("NewStep", "timeout_seconds"),
            Box::new(move |n| step_with("timeout_seconds")(json!(n))),
        ),
        (
            "runs",
            schema("CreateRuns", "runs"),
            Box::new(move |n| {
                Probe::Post("/v1/runs/batch", json!({ "runs": many(run_body(), n) }))
            }),
        ),
        (
            "limit",
            schema("RetryRuns", "limit"),
            Box::new(|n| Probe::Post("/v1/runs/retry", json!({ "limit": n }))),
        ),
        (
            "?limit",
            parameter("/v1/runs", "get", "limit"),
            Box::new(|n| Probe::Get(format!("/v1/runs?limit={n}"))),
        ),
        (
            "events ?limit",
            parameter("/v1/runs/{id}/events", "get", "limit"),
            {
                let id = run.id;
                Box::new(move |n| Probe::Get(format!("/v1/runs/{id}/events?limit={n}")))
            },
        ),
        (
            "Idempotency-Key",
            parameter("/v1/runs", "post", "Idempotency-Key"),
            Box::new(|n| Probe::Keyed("i".repeat(usize::try_from(n).unwrap_or(0)))),
        ),
    ];
    let client = Client::new();
    for (what, schema, make) in cases {
        let number = |key: &str| schema[key].as_f64().map(|v| v as i64);
        let (low, high) = match schema["type"].as_str() {
            Some("integer") => (number("minimum"), number("maximum")),
            Some("string") => (number("minLength"), number("maxLength")),
            Some("array") => (number("minItems"), number("maxItems")),
            other => panic!("{what}: unexpected type {other:?}"),
        };
        assert!(
            low.is_some() || high.is_some(),
            "{what}: the spec states no bound"
        );
        let mut probes = Vec::new();
        if let Some(low) = low {
            probes.extend([(low, true), (low - 1, false)]);
        }
        if let Some(high) = high {
            probes.extend([(high, true), (high + 1, false)]);
        }
        for (value, accepted) in probes {
            let request = match make(value) {
                Probe::Post(path, body) => client.post(format!("{}{path}", api.base)).json(&body),
                Probe::Get(path) => client.get(format!("{}{path}", api.base)),
                Probe::Keyed(key) => client
                    .post(format!("{}/v1/runs", api.base))
                    .header("Idempotency-Key", key)
                    .json(&run_body()),
            };
            let response = request.bearer_auth(&f.token).send().await.expect("send");
            let status = response.status();
            if accepted {
                assert!(
                    status.is_success(),
                    "{what} = {value} is within the spec and refused: {status} {}",
                    response.text().await.unwrap_or_default()
                );
            } else {
                let expected =
                    if what.starts_with('?') || what.contains(" ?") || what == "Idempotency-Key" {
                        StatusCode::BAD_REQUEST
                    } else {
                        StatusCode::UNPROCESSABLE_ENTITY
                    };
                let p = problem(response, expected).await;
                let field = what.trim_start_matches("events ").trim_start_matches('?');
                assert!(
                    p.detail.contains(field),
                    "{what} = {value}: detail '{}' names the field",
                    p.detail
                );
            }
        }
    }
}
