//! Streams as a service: refusals, a database blip, freed slots, shutdown.

use super::*;

/// A tenant can never stream another tenant's run: its id answers 404, as
/// an unknown one does, before any stream starts. A token without the
/// `runs` scope gets 403 on both streams, and a `Last-Event-ID` that is not
/// an id the stream sends gets 400; each as problem+json.
#[tokio::test]
async fn streams_refuse_other_tenants_wrong_scopes_and_bad_ids() {
    let f = Fixture::new().await;
    let run = f.counting_run(&f.token, &[0]).await;
    let admin = {
        let mut conn = f.db.pool.acquire().await.expect("connection");
        let tenant = f.db.tenant("acme").await;
        db::tokens::create(&mut conn, tenant, "admin", &[Scope::Admin], None)
            .await
            .expect("admin token")
            .plaintext
    };
    let expect = |response: reqwest::Response, status: StatusCode| async move {
        assert_eq!(response.status(), status);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(content_type, "application/problem+json");
        let problem: Problem = response.json().await.expect("a problem document");
        assert_eq!(problem.status, status.as_u16());
        problem
    };
    let client = Client::new();
    let theirs = sse::open(&client, &f.run_stream(run.id), &f.other_token, None).await;
    expect(theirs, StatusCode::NOT_FOUND).await;
    let resumed = sse::open(
        &client,
        &f.run_stream(run.id),
        &f.other_token,
        Some("1.0.0.0"),
    )
    .await;
    expect(resumed, StatusCode::NOT_FOUND).await;
    let unknown = sse::open(&client, &f.run_stream(Uuid::now_v7()), &f.token, None).await;
    expect(unknown, StatusCode::NOT_FOUND).await;
    for url in [f.run_stream(run.id), f.tenant_stream("")] {
        let problem = expect(
            sse::open(&client, &url, &admin, None).await,
            StatusCode::FORBIDDEN,
        )
        .await;
        assert!(problem.detail.contains("'runs'"), "{}", problem.detail);
    }
    for (url, bad) in [
        (f.run_stream(run.id), "abc"),
        (f.run_stream(run.id), "1-2"),
        (f.tenant_stream(""), "1.0.0.0"),
        (f.tenant_stream(""), "x-1"),
    ] {
        let problem = expect(
            sse::open(&client, &url, &f.token, Some(bad)).await,
            StatusCode::BAD_REQUEST,
        )
        .await;
        assert!(
            problem.detail.contains("Last-Event-ID"),
            "{}",
            problem.detail
        );
    }
}

/// Streams outlive a database blip: every connection of the API's pool is
/// terminated twice while a run executes, and a run stream and a tenant
/// stream that were open carry on, after backing off, with nothing missed
/// or repeated.
#[tokio::test]
async fn streams_survive_a_database_blip() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let acme = token(&db, tenant).await;
    let (project, ingest_token) = ingest_project(&db, tenant).await;
    // The API gets a pool of its own, named, so its connections alone can
    // be cut.
    let options: PgConnectOptions = db.url.parse().expect("url");
    let api_pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options.application_name("runq-streams-blip"));
    let mut config = TestApi::config();
    config.step_kinds = vec!["count".to_owned(), "fail_once".to_owned()];
    let served = Served {
        api: TestApi::start(api_pool, config),
        client: Client::new(),
        token: acme,
        db,
    };
    let f = Fixture {
        served,
        other_token: String::new(),
        project,
        ingest_token,
        executions: Executions::default(),
    };
    let mut tenant_stream = Stream::connect(&f.client, &f.tenant_stream(""), &f.token, None).await;
    let run = f.counting_run(&f.token, &[300, 800, 800]).await;
    let mut stream = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None).await;
    let worker = f.worker();
    let cut = || async {
        let cut: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = 'runq-streams-blip'",
        )
        .fetch_one(&f.db.pool)
        .await
        .expect("terminate");
        cut
    };
    let mut messages = stream.take(3).await;
    assert!(cut().await > 0, "the API's connections were cut");
    messages.extend(stream.take(3).await);
    cut().await;
    messages.extend(stream.rest().await);
    assert_eq!(f.status(run.id).await, "succeeded");
    check_run_contract(&f, run.id, &messages).await;
    let replay = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None)
        .await
        .rest()
        .await;
    assert_eq!(
        messages.iter().map(identity).collect::<Vec<_>>(),
        replay.iter().map(identity).collect::<Vec<_>>(),
        "the interrupted stream and a replay agree"
    );

    let mut changes = Vec::new();
    while changes.last().map(|m: &Message| m.event.as_str()) != Some("run.succeeded") {
        changes.push(
            tenant_stream
                .next()
                .await
                .expect("the tenant stream stays open"),
        );
    }
    let streamed: Vec<RunEvent> = changes
        .iter()
        .map(|m| serde_json::from_value(m.data.clone()).expect("RunEvent"))
        .collect();
    assert_eq!(streamed, f.published(run.id).await);
    worker.stop().await;
}

/// Each tenant may hold `max_streams_per_tenant` streams open on a process;
/// one more gets 429 with `Retry-After` while other tenants are unaffected,
/// and a client that leaves frees its slot: the server drops its stream,
/// and the stream's permit with it, once a keep-alive write finds the
/// connection closed (it has no earlier signal; here within two seconds).
#[tokio::test]
async fn a_client_that_leaves_frees_its_stream_slot() {
    let mut config = TestApi::config();
    config.max_streams_per_tenant = 2;
    config.stream_keep_alive_seconds = 1;
    let f = Fixture::with(config).await;
    let run = f.counting_run(&f.token, &[0]).await;
    let first = raw_stream(&f.api.base, "/v1/events/stream", &f.token).await;
    let _second = Stream::connect(&f.client, &f.run_stream(run.id), &f.token, None).await;
    let refused = sse::open(&f.client, &f.tenant_stream(""), &f.token, None).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let problem: Problem = refused.json().await.expect("problem");
    assert!(
        problem.detail.contains("RUNQ_MAX_STREAMS_PER_TENANT"),
        "{}",
        problem.detail
    );
    let _theirs = Stream::connect(&f.client, &f.tenant_stream(""), &f.other_token, None).await;

    drop(first);
    let reopened = wait_for_value("the slot of the closed stream to free", LIMIT, || async {
        let response = sse::open(&f.client, &f.tenant_stream(""), &f.token, None).await;
        (response.status() == StatusCode::OK).then_some(response)
    })
    .await;
    drop(reopened);
}

/// A graceful shutdown of the API ends its open streams (which never end by
/// themselves) instead of waiting for them: the server stops, and clients
/// see their streams close.
#[tokio::test]
async fn api_shutdown_ends_open_streams() {
    let db = TestDb::new().await;
    let tenant = db.tenant("acme").await;
    let acme = token(&db, tenant).await;
    let run = db
        .enqueue(tenant, vec![crate::support::echo_run(json!({}))])
        .await[0]
        .id;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let pool = db.pool.clone();
        let shutdown = stop.clone().cancelled_owned();
        async move { runq_api::serve_on(listener, pool, &TestApi::config(), shutdown).await }
    });
    let client = Client::new();
    let mut tenant_stream =
        Stream::connect(&client, &format!("{base}/v1/events/stream"), &acme, None).await;
    // No worker: the run stays pending and its stream open.
    let mut run_stream = Stream::connect(
        &client,
        &format!("{base}/v1/runs/{run}/events/stream"),
        &acme,
        None,
    )
    .await;
    assert_eq!(run_stream.take(1).await[0].event, "run.created");

    stop.cancel();
    let stopped = tokio::time::timeout(LIMIT, server)
        .await
        .expect("the server stops despite open streams");
    stopped.expect("server task").expect("serve");
    // Each ends (`rest` returns); the tenant's may first carry the run's
    // creation, if it committed as the stream started.
    assert_eq!(run_stream.rest().await, []);
    let creation = tenant_stream.rest().await;
    assert!(creation.len() <= 1, "{creation:?}");
}

/// Opens `path` with a hand-written HTTP/1.1 request on a socket of its own
/// and returns the socket once the answer's head says 200: dropping it
/// closes the connection at once, as a browser closing a tab does (reqwest
/// keeps a dropped response's connection open until it next reads on it).
async fn raw_stream(base: &str, path: &str, token: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
         Accept: text/event-stream\r\n\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buffer = [0u8; 1024];
        let read = tokio::time::timeout(LIMIT, socket.read(&mut buffer))
            .await
            .expect("the answer's head arrives")
            .expect("read");
        assert!(read > 0, "the server answered");
        head.extend_from_slice(&buffer[..read]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    socket
}
