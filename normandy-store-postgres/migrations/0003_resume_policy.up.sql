-- Normandy session store, stage 3: resume policy and the indexes reapers read.
--
-- Sessions created before this migration are lazy, which is what they were.
ALTER TABLE normandy_sessions
    ADD COLUMN resume_policy text DEFAULT 'lazy' CHECK (resume_policy IN ('lazy', 'eager'));

-- `list_resumable(Node(owner))`: a dead node's sessions, and only those, in id order.
CREATE INDEX normandy_sessions_resumable_owner_idx
    ON normandy_sessions (owner, id)
    WHERE resumable;

-- `list_resumable(Any)`: the rare sweep, still reading only resumable rows.
CREATE INDEX normandy_sessions_resumable_idx
    ON normandy_sessions (id)
    WHERE resumable;
