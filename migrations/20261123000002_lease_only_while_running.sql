-- A run holds a lease exactly while it is running. Worker writes are fenced on
-- `locked_by` and `attempt` alone (DESIGN.md, invariant 1), without a status
-- predicate that would steer the planner to the partial running-lease index
-- on stale statistics; this constraint keeps that fence exact.
ALTER TABLE runs ADD CONSTRAINT runs_lease_only_while_running
    CHECK ((status = 'running') = (locked_by IS NOT NULL)
           AND (locked_by IS NULL) = (lease_expires_at IS NULL));
