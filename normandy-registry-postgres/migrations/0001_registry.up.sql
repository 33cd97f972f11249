-- Normandy's Postgres registry and membership (tier 2p).
--
-- normandy_node_leases: one row per node incarnation (name, incarnation). Its expiry is always
-- written as now() + ttl and compared with now() on the server, never with a client's clock.
-- There is deliberately no index on expires_at: a heartbeat changes only that column, and with
-- no index on it (and free space on the page, fillfactor 50) every beat is a HOT update that
-- writes no index entry, which keeps the WAL per beat small. The table holds one row per live
-- node plus recently lapsed ones (a join deletes its name's lapsed rows), so a sequential
-- scan is the fastest plan for the member list anyway.
CREATE TABLE normandy_node_leases (
    name        text        NOT NULL,
    incarnation bigint      NOT NULL,
    -- The node's RPC address (host:port); '' for a lease taken without membership.
    address     text        NOT NULL,
    -- Whether the node joined as a cluster member (listed by the member poll).
    member      boolean     NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (name, incarnation)
) WITH (fillfactor = 50);

-- normandy_placements: where a session is live, by a primary key on the session id. A row
-- stays after its owner releases it (owner NULL) so the id's epoch keeps growing; a placement
-- resolves only while its owner's lease row is alive.
CREATE TABLE normandy_placements (
    session_id        text   PRIMARY KEY,
    owner_name        text,
    owner_incarnation bigint,
    epoch             bigint NOT NULL
);
