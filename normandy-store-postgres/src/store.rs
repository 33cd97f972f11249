//! [`PgStore`]: the Postgres [`SessionStore`], with fenced single-statement commits and group
//! commit across sessions.
//!
//! # How a commit is written
//! Every commit is one SQL statement, hence one transaction: a data-modifying CTE whose `UPDATE`
//! of the session row is conditioned on `(epoch, expected_seq, status = 'active')` and on no
//! batch input id being stored already, and whose `INSERT` of the entries runs only for a row the
//! `UPDATE` returned. Entries and turn state therefore land together or not at all, and a stale
//! writer cannot slip in between a check and a write: the `UPDATE` takes the row lock and, under
//! `READ COMMITTED`, re-checks its condition against the newest row version. When the `UPDATE`
//! matched nothing, a second read finds out why, in `InMemoryStore::commit`'s order: `NotFound`,
//! `SessionClosed`, `Fenced`, `DuplicateInput`, `Conflict`. Epochs and seqs only grow and a
//! terminal session never reopens, so the reason read after the fact is the reason the write
//! failed.
//!
//! # Group commit
//! `commit` hands its encoded batch over a bounded channel to a gatherer task, which takes
//! everything queued whenever one of its write slots is free (up to `max_batch`, one commit per
//! session per statement) and writes it with one statement over `UNNEST`ed arrays: each session's fenced `UPDATE` is evaluated per row, the
//! entries of the rows it returned are inserted, and each commit gets its own result. One fsync
//! then covers many commits. A batch of one takes the simple single-session statement instead.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    Capabilities, CommitAck, CommitBatch, Entry, Epoch, Error, InputId, NodeId, OwnerFilter,
    Result, ResumablePage, ResumableSession, ResumePolicy, Seq, SessionId, SessionRecord,
    SessionStatus, SessionStore, TurnState,
};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::PgStoreConfig;
use crate::error::{BACKEND, MIGRATION_NAMES, map_sqlx, missing_migration};

/// How far a database's schema goes: which of the staged migrations it has.
///
/// Detected from the catalog when the store opens, so it is right however the migrations were
/// applied (`cargo xtask migrate`, [`migrator`](crate::migrator), or the SQL files copied into an
/// application's own migrations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SchemaLevel {
    /// `0001_base`: sessions and entries. Sessions have no template and are all lazy.
    Base,
    /// `0002_template`: sessions may store their configuration template.
    Template,
    /// `0003_resume_policy`: resume policies and the resumable indexes (the latest).
    ResumePolicy,
}

impl SchemaLevel {
    /// The level this build writes and reads in full.
    pub const LATEST: SchemaLevel = SchemaLevel::ResumePolicy;

    /// The migration that brings a database to this level.
    pub fn migration(self) -> &'static str {
        MIGRATION_NAMES[self as usize]
    }

    /// Migrations this build knows that a database at this level lacks, oldest first.
    pub fn missing(self) -> Vec<&'static str> {
        MIGRATION_NAMES[self as usize + 1..].to_vec()
    }

    fn next(self) -> Option<SchemaLevel> {
        match self {
            SchemaLevel::Base => Some(SchemaLevel::Template),
            SchemaLevel::Template => Some(SchemaLevel::ResumePolicy),
            SchemaLevel::ResumePolicy => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQL. Every statement is a `&'static str` (sqlx 0.9's `SqlSafeStr`); the variants for older
// schemas are spelled out rather than formatted at run time.

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

const DETECT_SQL: &str = "SELECT \
    to_regclass('normandy_sessions') IS NOT NULL AND to_regclass('normandy_entries') IS NOT NULL, \
    EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('normandy_sessions') \
            AND attname = 'template' AND NOT attisdropped), \
    EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('normandy_sessions') \
            AND attname = 'resume_policy' AND NOT attisdropped) \
      AND to_regclass('normandy_sessions_resumable_owner_idx') IS NOT NULL \
      AND to_regclass('normandy_sessions_resumable_idx') IS NOT NULL";

const CREATE_BASE: &str = "INSERT INTO normandy_sessions (id, turn_state) VALUES ($1, $2) \
    ON CONFLICT (id) DO NOTHING \
    RETURNING (extract(epoch FROM created_at) * 1000)::bigint";
const CREATE_TEMPLATE: &str = "INSERT INTO normandy_sessions (id, turn_state, template) \
    VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING \
    RETURNING (extract(epoch FROM created_at) * 1000)::bigint";
const CREATE_FULL: &str = "INSERT INTO normandy_sessions (id, turn_state, template, resume_policy) \
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
const ACTIVATE: [&str; 3] = [
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
const LOAD: [&str; 3] = [load_sql!(base), load_sql!(template), load_sql!(full)];
const STATUS_SQL: &str = "SELECT status FROM normandy_sessions WHERE id = $1";

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
const COMMIT_ONE_NO_POLICY: &str = commit_one_sql!("($7::boolean AND false)");
const COMMIT_ONE: &str =
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
const COMMIT_GROUP_NO_POLICY: &str = commit_group_sql!("(c.has_work AND false)");
const COMMIT_GROUP: &str =
    commit_group_sql!("(c.has_work AND s.resume_policy IS NOT DISTINCT FROM 'eager')");

const WHY_SQL: &str = "SELECT epoch, seq, status FROM normandy_sessions WHERE id = $1";
const DUPS_SQL: &str = "SELECT input_id, seq FROM normandy_entries \
    WHERE session_id = $1 AND input_id = ANY($2::text[])";

const ENTRIES_SQL: &str = "SELECT seq, payload FROM normandy_entries \
    WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
const EXISTS_SQL: &str = "SELECT EXISTS (SELECT 1 FROM normandy_sessions WHERE id = $1)";

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
const LIST_NODE: &str = list_node_sql!();
const LIST_ANY: &str = list_any_sql!();
const EXPLAIN_LIST_NODE: &str = concat!("EXPLAIN ", list_node_sql!());
const EXPLAIN_LIST_ANY: &str = concat!("EXPLAIN ", list_any_sql!());

const TERMINAL_SQL: &str = "UPDATE normandy_sessions \
    SET status = 'terminal', resumable = false, updated_at = now() \
    WHERE id = $1 AND epoch = $2 AND status = 'active'";
const DELETE_SQL: &str = "DELETE FROM normandy_sessions WHERE id = $1";

// ---------------------------------------------------------------------------------------------

/// The Postgres session store. Cheap to clone: clones share the pool and the commit gatherer.
///
/// Tables live in the connections' `search_path` (see [`PgStoreConfig::schema`]); apply the
/// migrations first (see [`migrator`](crate::migrator)). The schema level is read when the
/// store opens: a migration applied later is used after the next open.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Commits waiting to be gathered; bounded so a slow database pushes back on callers.
    queue: mpsc::Sender<Job>,
}

/// What the gatherer and its writes share with the store.
struct Shared {
    pool: PgPool,
    level: SchemaLevel,
    max_batch: usize,
    max_batch_bytes: usize,
    /// Commit statements executed (single or group), for [`PgStore::write_stats`].
    statements: AtomicU64,
    /// Commits those statements carried.
    commits: AtomicU64,
}

/// How well commits were grouped, since the store opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Commit statements executed (each one transaction).
    pub statements: u64,
    /// Commits they carried; `commits / statements` is the mean group size.
    pub commits: u64,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema_level", &self.inner.shared.level)
            .field("max_batch", &self.inner.shared.max_batch)
            .finish_non_exhaustive()
    }
}

/// One encoded commit on its way to the gatherer.
struct Job {
    id: SessionId,
    epoch: i64,
    expected_seq: i64,
    new_seq: i64,
    state: Vec<u8>,
    has_work: bool,
    seqs: Vec<i64>,
    parents: Vec<Option<i64>>,
    kinds: Vec<&'static str>,
    input_ids: Vec<Option<String>>,
    payloads: Vec<Vec<u8>>,
    /// The batch's input ids, in batch order (the duplicate reported is the first stored one).
    inputs: Vec<String>,
    reply: oneshot::Sender<Result<CommitAck>>,
}

impl Job {
    /// About how many bytes this commit adds to a group statement's parameters (array element
    /// headers included).
    fn wire_size(&self) -> usize {
        let per_entry: usize = self
            .payloads
            .iter()
            .zip(&self.input_ids)
            .zip(&self.kinds)
            .map(|((p, i), k)| {
                p.len() + i.as_ref().map_or(0, String::len) + k.len() + self.id.as_str().len() + 64
            })
            .sum();
        self.id.as_str().len() + self.state.len() + 48 + per_entry
    }
}

impl PgStore {
    /// Connects, checks the schema, and starts the commit gatherer (on the current tokio
    /// runtime).
    ///
    /// Fails with `MissingMigration` naming the first missing migration when the database is
    /// older than [`PgStoreConfig::require_schema`], and with a retryable `Unavailable` when the
    /// server cannot be reached.
    pub async fn connect(config: PgStoreConfig) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .connect_with(config.connect_options())
            .await
            .map_err(map_sqlx)?;
        Self::from_pool(pool, &config).await
    }

    /// Opens the store on an existing pool (whose connections' `search_path` must reach the
    /// tables). Only the batching, schema-requirement and migrate-on-open settings of `config`
    /// apply.
    pub async fn from_pool(pool: PgPool, config: &PgStoreConfig) -> Result<Self> {
        if config.migrate_on_open {
            crate::migrator()
                .run(&pool)
                .await
                .map_err(|e| Error::Backend {
                    backend: BACKEND,
                    message: format!("applying migrations: {e}"),
                    retryable: false,
                })?;
        }
        let level = detect_level(&pool).await?;
        let Some(level) = level else {
            return Err(missing_migration(MIGRATION_NAMES[0]));
        };
        if level < config.require_schema {
            let first = level.next().unwrap_or(SchemaLevel::LATEST);
            return Err(missing_migration(first.migration()));
        }
        if level < SchemaLevel::LATEST {
            tracing::warn!(
                missing = ?level.missing(),
                "postgres store opened on an older schema: templates and eager resume need the missing migrations"
            );
        }
        let shared = Arc::new(Shared {
            pool,
            level,
            max_batch: config.max_batch,
            max_batch_bytes: config.max_batch_bytes,
            statements: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(config.queue_depth);
        tokio::spawn(gatherer(
            shared.clone(),
            rx,
            config.writers,
            config.stall_after,
        ));
        Ok(Self {
            inner: Arc::new(Inner { shared, queue: tx }),
        })
    }

    /// The connection pool (to share it, or to run the migrations on it).
    pub fn pool(&self) -> &PgPool {
        &self.inner.shared.pool
    }

    /// How many commit statements carried how many commits so far.
    pub fn write_stats(&self) -> WriteStats {
        WriteStats {
            statements: self.inner.shared.statements.load(Ordering::Relaxed),
            commits: self.inner.shared.commits.load(Ordering::Relaxed),
        }
    }

    /// Commits waiting to be gathered into a batch right now.
    pub fn queued_commits(&self) -> usize {
        self.inner.queue.max_capacity() - self.inner.queue.capacity()
    }

    /// The schema level found when the store opened.
    pub fn schema_level(&self) -> SchemaLevel {
        self.inner.shared.level
    }

    /// Migrations this build knows that the database lacked when the store opened.
    pub fn missing_migrations(&self) -> Vec<&'static str> {
        self.inner.shared.level.missing()
    }

    /// The plan Postgres chooses for `list_resumable(owner)`: for checking that it reads the
    /// resumable index, never every session.
    pub async fn explain_list_resumable(&self, owner: &OwnerFilter) -> Result<String> {
        self.require(SchemaLevel::ResumePolicy)?;
        let rows = match owner {
            OwnerFilter::Node(node) => {
                sqlx::query(EXPLAIN_LIST_NODE)
                    .bind(node.to_string())
                    .bind("")
                    .bind(100_i64)
                    .fetch_all(self.pool())
                    .await
            }
            OwnerFilter::Any => {
                sqlx::query(EXPLAIN_LIST_ANY)
                    .bind("")
                    .bind(100_i64)
                    .fetch_all(self.pool())
                    .await
            }
        }
        .map_err(map_sqlx)?;
        let mut plan = String::new();
        for row in rows {
            let line: String = row.try_get(0).map_err(map_sqlx)?;
            plan.push_str(&line);
            plan.push('\n');
        }
        Ok(plan)
    }

    fn require(&self, level: SchemaLevel) -> Result<()> {
        if self.inner.shared.level < level {
            return Err(missing_migration(level.migration()));
        }
        Ok(())
    }

    fn level_index(&self) -> usize {
        self.inner.shared.level as usize
    }
}

async fn detect_level(pool: &PgPool) -> Result<Option<SchemaLevel>> {
    let row = sqlx::query(DETECT_SQL)
        .fetch_one(pool)
        .await
        .map_err(map_sqlx)?;
    let base: bool = row.try_get(0).map_err(map_sqlx)?;
    let template: bool = row.try_get(1).map_err(map_sqlx)?;
    let resume: bool = row.try_get(2).map_err(map_sqlx)?;
    // Stages count only in order: a later one without an earlier one is treated as absent.
    Ok(match (base, template, resume) {
        (false, _, _) => None,
        (true, false, _) => Some(SchemaLevel::Base),
        (true, true, false) => Some(SchemaLevel::Template),
        (true, true, true) => Some(SchemaLevel::ResumePolicy),
    })
}

fn to_i64(v: u64, what: &str, id: &SessionId) -> Result<i64> {
    i64::try_from(v)
        .map_err(|_| Error::invalid_input(Some(id), format!("{what} {v} exceeds Postgres bigint")))
}

fn to_u64(v: i64, what: &str, id: &SessionId) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::corrupt(Some(id), what, format!("negative value {v}")))
}

fn policy_str(p: ResumePolicy) -> &'static str {
    match p {
        ResumePolicy::Lazy => "lazy",
        ResumePolicy::Eager => "eager",
    }
}

fn parse_status(s: &str, id: &SessionId) -> Result<SessionStatus> {
    SessionStatus::parse(s)
        .ok_or_else(|| Error::corrupt(Some(id), "session status", format!("unknown status {s:?}")))
}

fn record_from_row(row: &PgRow, id: &SessionId) -> Result<SessionRecord> {
    let get_err = map_sqlx;
    let epoch: i64 = row.try_get(1).map_err(get_err)?;
    let seq: i64 = row.try_get(2).map_err(get_err)?;
    let owner: Option<String> = row.try_get(3).map_err(get_err)?;
    let status: String = row.try_get(4).map_err(get_err)?;
    let state: Vec<u8> = row.try_get(5).map_err(get_err)?;
    let template: Option<Vec<u8>> = row.try_get(6).map_err(get_err)?;
    let policy: Option<String> = row.try_get(7).map_err(get_err)?;
    let created: i64 = row.try_get(8).map_err(get_err)?;
    let updated: i64 = row.try_get(9).map_err(get_err)?;
    let owner = owner
        .map(|o| {
            o.parse::<NodeId>()
                .map_err(|e| Error::corrupt(Some(id), "session owner", e))
        })
        .transpose()?;
    let resume_policy = match policy.as_deref() {
        None | Some("lazy") => ResumePolicy::Lazy,
        Some("eager") => ResumePolicy::Eager,
        Some(other) => {
            return Err(Error::corrupt(
                Some(id),
                "resume policy",
                format!("unknown policy {other:?}"),
            ));
        }
    };
    Ok(SessionRecord {
        id: id.clone(),
        epoch: to_u64(epoch, "session epoch", id)?,
        seq: to_u64(seq, "session seq", id)?,
        owner,
        status: parse_status(&status, id)?,
        resume_policy,
        template: template
            .as_deref()
            .map(|b| codec::decode(BlobKind::Template, b, Some(id)))
            .transpose()?,
        state: codec::decode(BlobKind::TurnState, &state, Some(id))?,
        created_at_ms: created.max(0) as u64,
        updated_at_ms: updated.max(0) as u64,
    })
}

#[async_trait]
impl SessionStore for PgStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::volatile()
            .durable(true)
            .shared_across_processes(true)
            .shared_across_hosts(true)
            .group_commit(self.inner.shared.max_batch > 1)
    }

    async fn create(&self, new: normandy_core::NewSession) -> Result<SessionRecord> {
        // Refuse what the schema cannot hold rather than drop it: a session stored without its
        // template could never be rebuilt on another node.
        if new.template.is_some() {
            self.require(SchemaLevel::Template)?;
        }
        if new.resume_policy != ResumePolicy::Lazy {
            self.require(SchemaLevel::ResumePolicy)?;
        }
        let state = TurnState::default();
        let state_blob = codec::encode(BlobKind::TurnState, &state)?;
        let template_blob = new
            .template
            .as_ref()
            .map(|t| codec::encode(BlobKind::Template, t))
            .transpose()?;
        let query = match self.inner.shared.level {
            SchemaLevel::Base => sqlx::query(CREATE_BASE)
                .bind(new.id.as_str())
                .bind(&state_blob),
            SchemaLevel::Template => sqlx::query(CREATE_TEMPLATE)
                .bind(new.id.as_str())
                .bind(&state_blob)
                .bind(&template_blob),
            SchemaLevel::ResumePolicy => sqlx::query(CREATE_FULL)
                .bind(new.id.as_str())
                .bind(&state_blob)
                .bind(&template_blob)
                .bind(policy_str(new.resume_policy)),
        };
        let row = query.fetch_optional(self.pool()).await.map_err(map_sqlx)?;
        let Some(row) = row else {
            return Err(Error::AlreadyExists { session: new.id });
        };
        let created: i64 = row.try_get(0).map_err(map_sqlx)?;
        let created = created.max(0) as u64;
        Ok(SessionRecord {
            id: new.id,
            epoch: 0,
            seq: 0,
            owner: None,
            status: SessionStatus::Active,
            resume_policy: new.resume_policy,
            template: new.template,
            state,
            created_at_ms: created,
            updated_at_ms: created,
        })
    }

    async fn activate(&self, id: &SessionId, node: &NodeId) -> Result<SessionRecord> {
        // A transaction, so a record that fails to decode rolls the epoch bump back: corrupt
        // bytes leave the session untouched, as in `InMemoryStore`.
        let mut tx = self.pool().begin().await.map_err(map_sqlx)?;
        let row = sqlx::query(ACTIVATE[self.level_index()])
            .bind(id.as_str())
            .bind(node.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(map_sqlx)?;
        let Some(row) = row else {
            let status = sqlx::query(STATUS_SQL)
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(map_sqlx)?;
            return Err(match status {
                None => Error::NotFound {
                    session: id.clone(),
                },
                Some(_) => Error::SessionClosed {
                    session: id.clone(),
                },
            });
        };
        let record = record_from_row(&row, id)?;
        tx.commit().await.map_err(map_sqlx)?;
        Ok(record)
    }

    async fn commit(
        &self,
        id: &SessionId,
        epoch: Epoch,
        expected_seq: Seq,
        batch: &CommitBatch,
    ) -> Result<CommitAck> {
        batch.validate(id, expected_seq)?;
        let state = codec::encode(BlobKind::TurnState, &batch.state)?;
        let n = batch.entries.len();
        let (mut seqs, mut parents, mut kinds, mut input_ids, mut payloads) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for e in &batch.entries {
            seqs.push(to_i64(e.seq, "entry seq", id)?);
            parents.push(
                e.parent
                    .map(|p| to_i64(p, "entry parent", id))
                    .transpose()?,
            );
            kinds.push(e.payload.kind_name());
            input_ids.push(e.payload.input_id().map(|i| i.as_str().to_string()));
            payloads.push(codec::encode(BlobKind::Entry, e)?);
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            id: id.clone(),
            epoch: to_i64(epoch, "epoch", id)?,
            expected_seq: to_i64(expected_seq, "expected seq", id)?,
            new_seq: to_i64(batch.new_seq(expected_seq), "seq", id)?,
            // `is_resumable` also needs an open, eager session: the statement checks the stored
            // status and policy, which this handle may not know.
            has_work: batch.state.has_work(),
            state,
            seqs,
            parents,
            kinds,
            inputs: batch.input_ids().map(|i| i.as_str().to_string()).collect(),
            input_ids,
            payloads,
            reply,
        };
        let gone = || Error::Unavailable {
            backend: BACKEND,
            message: "the store's commit gatherer has stopped (runtime shutting down?)".into(),
        };
        self.inner.queue.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        let row = sqlx::query(LOAD[self.level_index()])
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(map_sqlx)?;
        row.map(|r| record_from_row(&r, id)).transpose()
    }

    async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = sqlx::query(ENTRIES_SQL)
            .bind(id.as_str())
            .bind(after)
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(map_sqlx)?;
        if rows.is_empty() {
            let exists: bool = sqlx::query_scalar(EXISTS_SQL)
                .bind(id.as_str())
                .fetch_one(self.pool())
                .await
                .map_err(map_sqlx)?;
            if !exists {
                return Err(Error::NotFound {
                    session: id.clone(),
                });
            }
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(map_sqlx)?;
            let payload: &[u8] = row.try_get(1).map_err(map_sqlx)?;
            let entry: Entry = codec::decode(BlobKind::Entry, payload, Some(id))?;
            if i64::try_from(entry.seq).ok() != Some(seq) {
                return Err(Error::corrupt(
                    Some(id),
                    format!("entry {seq}"),
                    format!("stored under seq {seq} but encodes seq {}", entry.seq),
                ));
            }
            out.push(entry);
        }
        Ok(out)
    }

    async fn list_resumable(
        &self,
        owner: &OwnerFilter,
        cursor: Option<&SessionId>,
        limit: usize,
    ) -> Result<ResumablePage> {
        // Before 0003 every session is lazy, so none is resumable.
        if self.inner.shared.level < SchemaLevel::ResumePolicy || limit == 0 {
            return Ok(ResumablePage::default());
        }
        let after = cursor.map(SessionId::as_str).unwrap_or("");
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        let rows = match owner {
            OwnerFilter::Node(node) => {
                sqlx::query(LIST_NODE)
                    .bind(node.to_string())
                    .bind(after)
                    .bind(fetch)
                    .fetch_all(self.pool())
                    .await
            }
            OwnerFilter::Any => {
                sqlx::query(LIST_ANY)
                    .bind(after)
                    .bind(fetch)
                    .fetch_all(self.pool())
                    .await
            }
        }
        .map_err(map_sqlx)?;
        let more = rows.len() > limit;
        let mut sessions = Vec::with_capacity(rows.len().min(limit));
        for row in rows.iter().take(limit) {
            let raw: String = row.try_get(0).map_err(map_sqlx)?;
            let id = SessionId::new(&raw)
                .map_err(|e| Error::corrupt(None, format!("session id {raw:?}"), e))?;
            let owner: Option<String> = row.try_get(1).map_err(map_sqlx)?;
            let owner = owner
                .map(|o| {
                    o.parse::<NodeId>()
                        .map_err(|e| Error::corrupt(Some(&id), "session owner", e))
                })
                .transpose()?;
            let epoch: i64 = row.try_get(2).map_err(map_sqlx)?;
            let epoch = to_u64(epoch, "session epoch", &id)?;
            sessions.push(ResumableSession { id, owner, epoch });
        }
        let next = if more {
            sessions.last().map(|s| s.id.clone())
        } else {
            None
        };
        Ok(ResumablePage { sessions, next })
    }

    async fn mark_terminal(&self, id: &SessionId, epoch: Epoch) -> Result<()> {
        let done = sqlx::query(TERMINAL_SQL)
            .bind(id.as_str())
            .bind(to_i64(epoch, "epoch", id)?)
            .execute(self.pool())
            .await
            .map_err(map_sqlx)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let row = sqlx::query(WHY_SQL)
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(map_sqlx)?;
        let Some(row) = row else {
            return Err(Error::NotFound {
                session: id.clone(),
            });
        };
        let current: i64 = row.try_get(0).map_err(map_sqlx)?;
        let status: String = row.try_get(2).map_err(map_sqlx)?;
        if parse_status(&status, id)? == SessionStatus::Terminal {
            return Ok(());
        }
        Err(Error::Fenced {
            session: id.clone(),
            epoch,
            current: to_u64(current, "session epoch", id)?,
        })
    }

    async fn delete(&self, id: &SessionId) -> Result<bool> {
        let done = sqlx::query(DELETE_SQL)
            .bind(id.as_str())
            .execute(self.pool())
            .await
            .map_err(map_sqlx)?;
        Ok(done.rows_affected() > 0)
    }
}

// ---------------------------------------------------------------------------------------------
// Committers.

/// Gathers queued commits into batches and writes them; ends when every store handle is gone
/// and the queue is drained.
///
/// Normally one batch is written at a time, and it takes everything queued meanwhile: the busier
/// the store, the bigger the batches, and one fsync covers them all (a second concurrent writer
/// would grab the first few commits to arrive and halve the batches). Only when the write in
/// flight has taken longer than `stall_after` (a row lock held elsewhere, a slow disk) does the
/// gatherer open one of the `writers - 1` overflow slots, so one stalled batch cannot hold up
/// every session.
///
/// A batch also stops at `max_batch_bytes` of parameters: sqlx 0.9.0 leaves Nagle's algorithm on
/// (transact-rs/sqlx#4335), and a message larger than the socket's initial send buffer (16 KiB
/// on Linux) is written in parts, the last of which waits ~40 ms for a delayed ACK. Several
/// statements under the limit are far faster than one over it.
async fn gatherer(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<Job>,
    writers: usize,
    stall_after: Duration,
) {
    let primary = Arc::new(Semaphore::new(1));
    let overflow = Arc::new(Semaphore::new(writers.saturating_sub(1)));
    // A job that did not fit the previous batch opens the next one.
    let mut carry: Option<Job> = None;
    loop {
        let permit = tokio::select! {
            biased;
            p = primary.clone().acquire_owned() => p,
            p = async {
                tokio::time::sleep(stall_after).await;
                overflow.clone().acquire_owned().await
            } => p,
        };
        let Ok(permit) = permit else {
            return;
        };
        let first = match carry.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut bytes = first.wire_size();
        let mut jobs = vec![first];
        while jobs.len() < shared.max_batch {
            match queue.try_recv() {
                Ok(job) => {
                    let size = job.wire_size();
                    if bytes + size > shared.max_batch_bytes {
                        carry = Some(job);
                        break;
                    }
                    bytes += size;
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            // A statement carries one commit per session (its `UPDATE ... FROM c` must match
            // each row once); a second commit of the same session waits for the next round.
            let mut pending = jobs;
            while !pending.is_empty() {
                let mut seen = HashSet::with_capacity(pending.len());
                let (round, rest): (Vec<Job>, Vec<Job>) =
                    pending.into_iter().partition(|j| seen.insert(j.id.clone()));
                pending = rest;
                write_round(&shared, round).await;
            }
            drop(permit);
        });
    }
}

async fn write_round(shared: &Shared, mut round: Vec<Job>) {
    if round.len() == 1 {
        if let Some(job) = round.pop() {
            let result = commit_one(shared, &job).await;
            let _ = job.reply.send(result);
        }
        return;
    }
    match commit_group(shared, &round).await {
        Ok(applied) => {
            for job in round {
                let result = if applied.contains(job.id.as_str()) {
                    to_u64(job.new_seq, "seq", &job.id).map(|seq| CommitAck::Applied { seq })
                } else {
                    explain_failure(&shared.pool, &job).await
                };
                let _ = job.reply.send(result);
            }
        }
        Err(GroupError::Unique) => {
            // Some commit raced a duplicate input in: write them one by one so only it fails.
            for job in round {
                let result = commit_one(shared, &job).await;
                let _ = job.reply.send(result);
            }
        }
        Err(GroupError::Other(e)) => {
            for job in round {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Attempts at a statement that failed with a deadlock or serialization failure (nothing was
/// written, so trying again is safe).
const ATTEMPTS: usize = 3;

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

async fn commit_one(shared: &Shared, job: &Job) -> Result<CommitAck> {
    let sql = if shared.level >= SchemaLevel::ResumePolicy {
        COMMIT_ONE
    } else {
        COMMIT_ONE_NO_POLICY
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        shared.statements.fetch_add(1, Ordering::Relaxed);
        shared.commits.fetch_add(1, Ordering::Relaxed);
        let result = sqlx::query_scalar::<_, i64>(sql)
            .bind(job.id.as_str())
            .bind(job.epoch)
            .bind(job.expected_seq)
            .bind(&job.inputs)
            .bind(job.new_seq)
            .bind(&job.state)
            .bind(job.has_work)
            .bind(&job.seqs)
            .bind(&job.parents)
            .bind(&job.kinds)
            .bind(&job.input_ids)
            .bind(&job.payloads)
            .fetch_one(&shared.pool)
            .await;
        match result {
            Ok(1) => {
                return to_u64(job.new_seq, "seq", &job.id).map(|seq| CommitAck::Applied { seq });
            }
            Ok(_) => return explain_failure(&shared.pool, job).await,
            Err(e) if is_unique_violation(&e) => return explain_failure(&shared.pool, job).await,
            Err(e) => {
                let e = map_sqlx(e);
                if attempt < ATTEMPTS
                    && matches!(
                        e,
                        Error::Backend {
                            retryable: true,
                            ..
                        }
                    )
                {
                    continue;
                }
                return Err(e);
            }
        }
    }
}

enum GroupError {
    /// A unique violation: a duplicate input raced into the batch.
    Unique,
    Other(Error),
}

async fn commit_group(
    shared: &Shared,
    round: &[Job],
) -> std::result::Result<HashSet<String>, GroupError> {
    let sql = if shared.level >= SchemaLevel::ResumePolicy {
        COMMIT_GROUP
    } else {
        COMMIT_GROUP_NO_POLICY
    };
    let n = round.len();
    let m: usize = round.iter().map(|j| j.seqs.len()).sum();
    let mut c_id = Vec::with_capacity(n);
    let mut c_epoch = Vec::with_capacity(n);
    let mut c_expected = Vec::with_capacity(n);
    let mut c_new = Vec::with_capacity(n);
    let mut c_state: Vec<&[u8]> = Vec::with_capacity(n);
    let mut c_work = Vec::with_capacity(n);
    let mut e_session = Vec::with_capacity(m);
    let mut e_seq = Vec::with_capacity(m);
    let mut e_parent = Vec::with_capacity(m);
    let mut e_kind = Vec::with_capacity(m);
    let mut e_input: Vec<Option<&str>> = Vec::with_capacity(m);
    let mut e_payload: Vec<&[u8]> = Vec::with_capacity(m);
    for job in round {
        c_id.push(job.id.as_str());
        c_epoch.push(job.epoch);
        c_expected.push(job.expected_seq);
        c_new.push(job.new_seq);
        c_state.push(&job.state);
        c_work.push(job.has_work);
        for i in 0..job.seqs.len() {
            e_session.push(job.id.as_str());
            e_seq.push(job.seqs[i]);
            e_parent.push(job.parents[i]);
            e_kind.push(job.kinds[i]);
            e_input.push(job.input_ids[i].as_deref());
            e_payload.push(&job.payloads[i]);
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        shared.statements.fetch_add(1, Ordering::Relaxed);
        shared.commits.fetch_add(n as u64, Ordering::Relaxed);
        let result = sqlx::query_scalar::<_, String>(sql)
            .bind(&c_id)
            .bind(&c_epoch)
            .bind(&c_expected)
            .bind(&c_new)
            .bind(&c_state)
            .bind(&c_work)
            .bind(&e_session)
            .bind(&e_seq)
            .bind(&e_parent)
            .bind(&e_kind)
            .bind(&e_input)
            .bind(&e_payload)
            .fetch_all(&shared.pool)
            .await;
        match result {
            Ok(ids) => {
                tracing::trace!(commits = n, applied = ids.len(), "group commit");
                return Ok(ids.into_iter().collect());
            }
            Err(e) if is_unique_violation(&e) => return Err(GroupError::Unique),
            Err(e) => {
                let e = map_sqlx(e);
                if attempt < ATTEMPTS
                    && matches!(
                        e,
                        Error::Backend {
                            retryable: true,
                            ..
                        }
                    )
                {
                    continue;
                }
                return Err(GroupError::Other(e));
            }
        }
    }
}

/// Why a commit's fenced `UPDATE` matched nothing, checked in `InMemoryStore::commit`'s order.
async fn explain_failure(pool: &PgPool, job: &Job) -> Result<CommitAck> {
    let id = &job.id;
    let row = sqlx::query(WHY_SQL)
        .bind(id.as_str())
        .fetch_optional(pool)
        .await
        .map_err(map_sqlx)?;
    let Some(row) = row else {
        return Err(Error::NotFound {
            session: id.clone(),
        });
    };
    let current: i64 = row.try_get(0).map_err(map_sqlx)?;
    let seq: i64 = row.try_get(1).map_err(map_sqlx)?;
    let status: String = row.try_get(2).map_err(map_sqlx)?;
    if parse_status(&status, id)? == SessionStatus::Terminal {
        return Err(Error::SessionClosed {
            session: id.clone(),
        });
    }
    if current != job.epoch {
        return Err(Error::Fenced {
            session: id.clone(),
            epoch: to_u64(job.epoch, "epoch", id)?,
            current: to_u64(current, "session epoch", id)?,
        });
    }
    if !job.inputs.is_empty() {
        let rows = sqlx::query(DUPS_SQL)
            .bind(id.as_str())
            .bind(&job.inputs)
            .fetch_all(pool)
            .await
            .map_err(map_sqlx)?;
        let mut stored = HashMap::with_capacity(rows.len());
        for row in rows {
            let input: String = row.try_get(0).map_err(map_sqlx)?;
            let seq: i64 = row.try_get(1).map_err(map_sqlx)?;
            stored.insert(input, seq);
        }
        for input in &job.inputs {
            if let Some(seq) = stored.get(input) {
                return Ok(CommitAck::DuplicateInput {
                    input_id: InputId::new(input)?,
                    seq: to_u64(*seq, "entry seq", id)?,
                });
            }
        }
    }
    // Either the seq moved, or (rarely) the row changed back under us between the write and this
    // read, which only a delete and re-create can do: both are a conflict to re-read and retry.
    Err(Error::Conflict {
        session: id.clone(),
        expected: to_u64(job.expected_seq, "expected seq", id)?,
        actual: to_u64(seq, "session seq", id)?,
    })
}
