-- The stored_events quota (README, "Quotas and plans"): a tenant keeps its
-- newest N events and the oldest roll off. The trimmer finds a tenant's
-- N-th newest event and deletes what is older by walking this index; it
-- also makes the quota report's count an index-only scan.
CREATE INDEX run_events_tenant_idx ON run_events (tenant_id, id);
