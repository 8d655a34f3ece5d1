-- Quotas per tenant (README, "Quotas and plans"): a plan and per-quota
-- overrides, and a counter of runs accepted per hour so that checking the
-- rolling 24 h run quota reads at most 24 small rows instead of counting runs.
--
-- A tenant without a row here is on the server's default plan
-- (RUNQ_DEFAULT_PLAN). The numbers of each plan live in Rust
-- (runq_shared::quotas), in one place.

CREATE TABLE tenant_quotas (
    tenant_id   uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    plan        text NOT NULL CHECK (plan IN ('free', 'unlimited')),
    -- {"runs_per_day": 100, "projects": null}: a number replaces the plan's
    -- limit, null removes it. Keys are checked by the application.
    overrides   jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(overrides) = 'object'),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Runs accepted per tenant and hour (window_start = the hour). Written only
-- for tenants with a runs_per_day limit, in the enqueue transaction, under a
-- per-tenant advisory lock, so two API processes cannot together pass the
-- limit. Buckets older than the window are deleted by the next charge.
CREATE TABLE tenant_usage (
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    window_start  timestamptz NOT NULL,
    runs          bigint NOT NULL CHECK (runs >= 0),
    PRIMARY KEY (tenant_id, window_start)
);
