-- Scoped tokens, projects with a production safety gate, and an append-only
-- audit log (issue 8).

-- An ingest token is bound to one project of its own tenant: the composite
-- key makes a token of one tenant naming another tenant's project
-- impossible, not merely checked.
ALTER TABLE projects ADD CONSTRAINT projects_tenant_id_id_key UNIQUE (tenant_id, id);

-- Tokens issued before scopes existed could do everything; they keep doing
-- what they could (admin and runs), so `runq dev`'s and scripts' tokens work.
ALTER TABLE api_tokens
    ADD COLUMN scopes text[] NOT NULL DEFAULT ARRAY['admin', 'runs'],
    ADD COLUMN project_id uuid,
    ADD COLUMN last_used_at timestamptz;
ALTER TABLE api_tokens ALTER COLUMN scopes DROP DEFAULT;
ALTER TABLE api_tokens
    ADD CONSTRAINT api_tokens_scopes_known CHECK (
        cardinality(scopes) >= 1 AND scopes <@ ARRAY['admin', 'runs', 'ingest']),
    ADD CONSTRAINT api_tokens_ingest_has_project CHECK (
        project_id IS NOT NULL OR NOT ('ingest' = ANY (scopes))),
    -- Deleting a project deletes the ingest tokens bound to it: they could
    -- do nothing else.
    ADD CONSTRAINT api_tokens_project_fkey FOREIGN KEY (tenant_id, project_id)
        REFERENCES projects (tenant_id, id) ON DELETE CASCADE;
CREATE INDEX api_tokens_tenant_id_idx ON api_tokens (tenant_id, id);

-- The production override: runs against a `prod` project are refused unless
-- it is on. Who turned it on and when is shown on the project and recorded in
-- the audit log.
ALTER TABLE projects
    ADD COLUMN production_override boolean NOT NULL DEFAULT false,
    ADD COLUMN override_enabled_by uuid REFERENCES api_tokens (id) ON DELETE SET NULL,
    ADD COLUMN override_enabled_at timestamptz,
    ADD CONSTRAINT projects_override_when CHECK (
        production_override = (override_enabled_at IS NOT NULL));

-- Who did what to which tenant's settings. `actor_token_id` is the API token
-- that acted (no foreign key: the log outlives whatever it names), null for
-- an operator's CLI action; `actor` says who in words (`token:<id>`,
-- `operator:<user>`).
CREATE TABLE audit_log (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id),
    actor_token_id uuid,
    actor          text NOT NULL,
    action         text NOT NULL,
    target         text NOT NULL,
    details        jsonb NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_tenant_id_idx ON audit_log (tenant_id, id DESC);
CREATE INDEX audit_log_tenant_id_action_idx ON audit_log (tenant_id, action, id DESC);

-- Append-only: rows can be added, never changed or removed, whoever asks.
CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
