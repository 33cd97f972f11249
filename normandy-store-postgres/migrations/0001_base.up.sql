-- Normandy session store, stage 1: sessions and their entries.
--
-- Table names carry a `normandy_` prefix so they can live in an application's own schema without
-- colliding with its tables. Ids use the "C" collation so `ORDER BY id` is byte order: the order
-- every Normandy backend pages in.

CREATE TABLE normandy_sessions (
    id          text COLLATE "C" PRIMARY KEY,
    -- Fencing epoch, bumped by every activation; commits carry it and are refused when stale.
    epoch       bigint      NOT NULL DEFAULT 0,
    -- Seq of the last committed entry.
    seq         bigint      NOT NULL DEFAULT 0,
    -- The node (`name#incarnation`) that last activated the session.
    owner       text COLLATE "C",
    status      text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'terminal')),
    -- Versioned MessagePack (normandy_core::codec) of the turn state.
    turn_state  bytea       NOT NULL,
    -- Eager, open and with work pending: what a reaper resumes (maintained by the store).
    resumable   boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE normandy_entries (
    session_id  text COLLATE "C" NOT NULL REFERENCES normandy_sessions (id) ON DELETE CASCADE,
    seq         bigint NOT NULL,
    parent      bigint,
    kind        text   NOT NULL,
    -- Set on `input` entries: an input is stored at most once per session.
    input_id    text COLLATE "C",
    -- Versioned MessagePack (normandy_core::codec) of the entry.
    payload     bytea  NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE UNIQUE INDEX normandy_entries_input_idx
    ON normandy_entries (session_id, input_id)
    WHERE input_id IS NOT NULL;
