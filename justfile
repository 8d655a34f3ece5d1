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

# fmt, clippy, sqlx offline data (when a database answers) and spec staleness.
lint:
    cargo fmt --all --check
    cargo clippy --all-targets -- -D warnings
    just sqlx-check
    cargo test --test suite -- contract::committed_openapi_matches_generated

# Rewrite the committed OpenAPI document from the code.
openapi:
    cargo run -q -- openapi > openapi/openapi.json

# Database the sqlx macros check queries against (migrated by `sqlx-prepare`).
sqlx_db := env_var_or_default("RUNQ_SQLX_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/runq_sqlx")

# Regenerate .sqlx/ (compile-time query data) against a live database.
sqlx-prepare:
    cargo run -q -- migrate --database-url {{sqlx_db}}
    rm -rf .sqlx && mkdir .sqlx
    touch shared/src/lib.rs
    SQLX_OFFLINE=false DATABASE_URL={{sqlx_db}} cargo check --workspace --all-targets

# Fail if .sqlx/ is stale against a live database.
sqlx-check:
    cargo run -q -- migrate --database-url {{sqlx_db}}
    cp -r .sqlx /tmp/runq-sqlx-before && rm -rf .sqlx && mkdir .sqlx && touch shared/src/lib.rs
    SQLX_OFFLINE=false DATABASE_URL={{sqlx_db}} cargo check --workspace --all-targets
    diff -r /tmp/runq-sqlx-before .sqlx && rm -rf /tmp/runq-sqlx-before
