//! The SQL the store runs. Every statement is a `&'static str` (sqlx 0.9's `SqlSafeStr`); the
//! variants for older schemas are spelled out rather than formatted at run time.

/// Record columns, in the order `record_from_row` reads them.
macro_rules! record_cols {
    (base) => {
        "id, epoch, seq, owner, status, turn_state, NULL::bytea AS template, NULL::text AS resume_policy, \
         (extract(epoch FROM created_at) * 1000)::bigint AS created_ms, \
         (extract(epoch FROM updated_at) * 1000)::bigint AS updated_ms"
    };
    (template) => {
        "id, epoch, seq, owner, status, turn_state, template, NULL::text AS resume_policy, \
         (extract(epoch FROM created_at) * 1000)::bigint AS created_ms, \
         (extract(epoch FROM updated_at) * 1000)::bigint AS updated_ms"
    };
    (full) => {
        "id, epoch, seq, owner, status, turn_state, template, resume_policy, \
         (extract(epoch FROM created_at) * 1000)::bigint AS created_ms, \
         (extract(epoch FROM updated_at) * 1000)::bigint AS updated_ms"
    };
}

pub(crate) const CREATE_BASE: &str = "INSERT INTO normandy_sessions (id, turn_state) VALUES ($1, $2) \
    ON CONFLICT (id) DO NOTHING \
    RETURNING (extract(epoch FROM created_at) * 1000)::bigint";
pub(crate) const CREATE_TEMPLATE: &str = "INSERT INTO normandy_sessions (id, turn_state, template) \
    VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING \
    RETURNING (extract(epoch FROM created_at) * 1000)::bigint";
pub(crate) const CREATE_FULL: &str = "INSERT INTO normandy_sessions (id, turn_state, template, resume_policy) \
    VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING \
    RETURNING (extract(epoch FROM created_at) * 1000)::bigint";

macro_rules! activate_sql {
    ($level:tt) => {
        concat!(
            "UPDATE normandy_sessions SET epoch = epoch + 1, owner = $2, updated_at = now() \
             WHERE id = $1 AND status = 'active' RETURNING ",
            record_cols!($level)
        )
    };
}
pub(crate) const ACTIVATE: [&str; 3] = [
    activate_sql!(base),
    activate_sql!(template),
    activate_sql!(full),
];

macro_rules! load_sql {
    ($level:tt) => {
        concat!(
            "SELECT ",
            record_cols!($level),
            " FROM normandy_sessions WHERE id = $1"
        )
    };
}
pub(crate) const LOAD: [&str; 3] = [load_sql!(base), load_sql!(template), load_sql!(full)];
pub(crate) const STATUS_SQL: &str = "SELECT status FROM normandy_sessions WHERE id = $1";

/// One session's commit. `$7` is whether the new turn state has work; the session is resumable
/// when it also is eager (and, by the `WHERE`, open).
macro_rules! commit_one_sql {
    ($resumable:literal) => {
        concat!(
            "WITH dup AS ( \
                SELECT 1 FROM normandy_entries \
                 WHERE session_id = $1 AND input_id = ANY($4::text[]) LIMIT 1 \
             ), upd AS ( \
                UPDATE normandy_sessions \
                   SET seq = $5, turn_state = $6, resumable = ",
            $resumable,
            ", updated_at = now() \
                 WHERE id = $1 AND epoch = $2 AND seq = $3 AND status = 'active' \
                   AND NOT EXISTS (SELECT 1 FROM dup) \
                RETURNING id \
             ), ins AS ( \
                INSERT INTO normandy_entries (session_id, seq, parent, kind, input_id, payload) \
                SELECT upd.id, e.seq, e.parent, e.kind, e.input_id, e.payload \
                  FROM upd, UNNEST($8::bigint[], $9::bigint[], $10::text[], $11::text[], $12::bytea[]) \
                       AS e(seq, parent, kind, input_id, payload) \
             ) \
             SELECT count(*) FROM upd"
        )
    };
}
pub(crate) const COMMIT_ONE_NO_POLICY: &str = commit_one_sql!("($7::boolean AND false)");
pub(crate) const COMMIT_ONE: &str =
    commit_one_sql!("($7::boolean AND resume_policy IS NOT DISTINCT FROM 'eager')");

/// Many sessions' commits in one statement: each row of `c` is one commit, each row of `e` one
/// entry (keyed by session id: a statement carries at most one commit per session).
macro_rules! commit_group_sql {
    ($resumable:literal) => {
        concat!(
            "WITH c AS ( \
                SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bytea[], $6::boolean[]) \
                    AS c(id, epoch, expected_seq, new_seq, state, has_work) \
             ), e AS ( \
                SELECT * FROM UNNEST($7::text[], $8::bigint[], $9::bigint[], $10::text[], $11::text[], $12::bytea[]) \
                    AS e(session_id, seq, parent, kind, input_id, payload) \
             ), dup AS ( \
                SELECT DISTINCT x.session_id FROM normandy_entries x \
                  JOIN e ON x.session_id = e.session_id AND x.input_id = e.input_id \
             ), upd AS ( \
                UPDATE normandy_sessions s \
                   SET seq = c.new_seq, turn_state = c.state, resumable = ",
            $resumable,
            ", updated_at = now() \
                  FROM c \
                 WHERE s.id = c.id AND s.epoch = c.epoch AND s.seq = c.expected_seq \
                   AND s.status = 'active' \
                   AND NOT EXISTS (SELECT 1 FROM dup WHERE dup.session_id = c.id) \
                RETURNING s.id \
             ), ins AS ( \
                INSERT INTO normandy_entries (session_id, seq, parent, kind, input_id, payload) \
                SELECT e.session_id, e.seq, e.parent, e.kind, e.input_id, e.payload \
                  FROM e JOIN upd ON upd.id = e.session_id \
             ) \
             SELECT id FROM upd"
        )
    };
}
pub(crate) const COMMIT_GROUP_NO_POLICY: &str = commit_group_sql!("(c.has_work AND false)");
pub(crate) const COMMIT_GROUP: &str =
    commit_group_sql!("(c.has_work AND s.resume_policy IS NOT DISTINCT FROM 'eager')");

pub(crate) const WHY_SQL: &str = "SELECT epoch, seq, status FROM normandy_sessions WHERE id = $1";
pub(crate) const DUPS_SQL: &str = "SELECT input_id, seq FROM normandy_entries \
    WHERE session_id = $1 AND input_id = ANY($2::text[])";

pub(crate) const ENTRIES_SQL: &str = "SELECT seq, payload FROM normandy_entries \
    WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
pub(crate) const EXISTS_SQL: &str = "SELECT EXISTS (SELECT 1 FROM normandy_sessions WHERE id = $1)";

// `id > $2` with '' for "no cursor": every id is non-empty, and the "C" collation makes '' the
// least string, so one statement serves both and the range stays an index condition.
macro_rules! list_node_sql {
    () => {
        "SELECT id, owner, epoch FROM normandy_sessions \
         WHERE resumable AND owner = $1 AND id > $2 ORDER BY owner, id LIMIT $3"
    };
}
macro_rules! list_any_sql {
    () => {
        "SELECT id, owner, epoch FROM normandy_sessions \
         WHERE resumable AND id > $1 ORDER BY id LIMIT $2"
    };
}
pub(crate) const LIST_NODE: &str = list_node_sql!();
pub(crate) const LIST_ANY: &str = list_any_sql!();
pub(crate) const EXPLAIN_LIST_NODE: &str = concat!("EXPLAIN ", list_node_sql!());
pub(crate) const EXPLAIN_LIST_ANY: &str = concat!("EXPLAIN ", list_any_sql!());

pub(crate) const TERMINAL_SQL: &str = "UPDATE normandy_sessions \
    SET status = 'terminal', resumable = false, updated_at = now() \
    WHERE id = $1 AND epoch = $2 AND status = 'active'";
pub(crate) const DELETE_SQL: &str = "DELETE FROM normandy_sessions WHERE id = $1";
