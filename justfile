# runq developer tasks. Everything here is plain cargo underneath; `just` is a
# convenience, not a prerequisite.

# Run API + worker on a database found without configuration.
dev:
    cargo run -- dev

# The whole suite (fault tests included), as CI runs it.
test:
    cargo test --workspace

# The suite without the slow fault tests.
test-fast:
    cargo test --workspace -- --skip faults::

# The load tool (BENCH.md) in release mode, then the criterion micro-benches.
bench:
    cargo run --release -- bench
    cargo bench --bench hot_path

# The churn soak (README, "Bloat under churn"): N runs (default 1,000,000)
# through enqueue, claim, completion and pruning, sampling claim latency and
# table sizes. Use a database of its own: it truncates the run tables.
soak n="1000000":
    cargo run --release -- bench --phases soak --n {{n}}

# fmt, clippy, sqlx offline data (when a database answers) and spec staleness.
lint:
    cargo fmt --all --check
    cargo clippy --all-targets -- -D warnings
    just sqlx-check
    cargo test --test suite -- contract::committed_openapi_matches_generated

# Rewrite the committed OpenAPI document from the code.
openapi:
    cargo run -q -- openapi > openapi/openapi.json

# Regenerate .sqlx/ (compile-time query data) against a scratch database
# migrated on the local Postgres (RUNQ_SQLX_SERVER; see .ci/sqlx-check).
sqlx-prepare:
    .ci/sqlx-check --write

# Fail if .sqlx/ is stale against the migrations and the queries (skipped,
# with a message, where no Postgres answers). CI runs the same script.
sqlx-check:
    .ci/sqlx-check
