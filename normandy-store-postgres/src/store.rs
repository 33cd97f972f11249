//! [`PgStore`]: the Postgres [`SessionStore`]. Reads run here; commits go through the gatherer
//! in `group`; the schema check, the pool, the SQL and the row decoding each have their own file.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    Capabilities, CommitAck, CommitBatch, Entry, Epoch, Error, NodeId, OwnerFilter, Result,
    ResumablePage, ResumableSession, ResumePolicy, Seq, SessionId, SessionRecord, SessionStatus,
    SessionStore, TurnState,
};
use sqlx::Row;
use sqlx::postgres::PgPool;

use crate::conn::Db;
use tokio::sync::{mpsc, oneshot};

use crate::config::PgStoreConfig;
use crate::error::{BACKEND, map_sqlx, missing_migration};
use crate::group::{Job, Shared, WriteStats};
use crate::record::{parse_status, policy_str, record_from_row, to_i64, to_u64};
use crate::schema::SchemaLevel;
use crate::sql::{
    ACTIVATE, CREATE_BASE, CREATE_FULL, CREATE_TEMPLATE, DELETE_SQL, ENTRIES_SQL, EXISTS_SQL,
    EXPLAIN_LIST_ANY, EXPLAIN_LIST_NODE, LIST_ANY, LIST_NODE, LOAD, STATUS_SQL, TERMINAL_SQL,
    WHY_SQL,
};

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

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema_level", &self.inner.shared.level)
            .field("max_batch", &self.inner.shared.max_batch)
            .finish_non_exhaustive()
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
        let pool = crate::conn::connect(&config).await?;
        Self::from_pool(pool, &config).await
    }

    /// Opens the store on an existing pool (whose connections' `search_path` must reach the
    /// tables). Only the batching, schema-requirement, migrate-on-open and pooler settings of
    /// `config` apply (through a transaction pooler, also its schema and timeouts, which every
    /// transaction sets).
    pub async fn from_pool(pool: PgPool, config: &PgStoreConfig) -> Result<Self> {
        let db = Db::new(pool, config);
        let level = crate::schema::check(&db, config).await?;
        let shared = Arc::new(Shared {
            db,
            level,
            max_batch: config.max_batch,
            max_batch_bytes: config.max_batch_bytes,
            statements: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        });
        let queue = crate::group::start(shared.clone(), config);
        Ok(Self {
            inner: Arc::new(Inner { shared, queue }),
        })
    }

    /// The connection pool (to share it, or to run the migrations on it).
    pub fn pool(&self) -> &PgPool {
        &self.inner.shared.db.pool
    }

    fn db(&self) -> &Db {
        &self.inner.shared.db
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
        let p = self.db().persistent();
        let mut op = self.db().op().await.map_err(map_sqlx)?;
        let rows = match owner {
            OwnerFilter::Node(node) => {
                sqlx::query(EXPLAIN_LIST_NODE)
                    .persistent(p)
                    .bind(node.to_string())
                    .bind("")
                    .bind(100_i64)
                    .fetch_all(op.conn())
                    .await
            }
            OwnerFilter::Any => {
                sqlx::query(EXPLAIN_LIST_ANY)
                    .persistent(p)
                    .bind("")
                    .bind(100_i64)
                    .fetch_all(op.conn())
                    .await
            }
        }
        .map_err(map_sqlx)?;
        op.finish().await.map_err(map_sqlx)?;
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
            self.require(SchemaLevel::Template)
                .map_err(|e| e.in_session(&new.id))?;
        }
        if new.resume_policy != ResumePolicy::Lazy {
            self.require(SchemaLevel::ResumePolicy)
                .map_err(|e| e.in_session(&new.id))?;
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
        let in_session = |e| map_sqlx(e).in_session(&new.id);
        let mut op = self.db().op().await.map_err(in_session)?;
        let row = query
            .persistent(self.db().persistent())
            .fetch_optional(op.conn())
            .await
            .map_err(in_session)?;
        op.finish().await.map_err(in_session)?;
        let Some(row) = row else {
            return Err(Error::AlreadyExists { session: new.id });
        };
        let created: i64 = row
            .try_get(0)
            .map_err(|e| map_sqlx(e).in_session(&new.id))?;
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
        let p = self.db().persistent();
        let mut tx = self
            .db()
            .begin()
            .await
            .map_err(|e| map_sqlx(e).in_session(id))?;
        let row = sqlx::query(ACTIVATE[self.level_index()])
            .persistent(p)
            .bind(id.as_str())
            .bind(node.to_string())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| map_sqlx(e).in_session(id))?;
        let Some(row) = row else {
            let status = sqlx::query(STATUS_SQL)
                .persistent(p)
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| map_sqlx(e).in_session(id))?;
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
        tx.commit().await.map_err(|e| map_sqlx(e).in_session(id))?;
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
        let (reply, answer) = oneshot::channel();
        let job = Job::encode(id, epoch, expected_seq, batch, reply)?;
        let gone = || Error::Unavailable {
            backend: BACKEND,
            message: "the store's commit gatherer has stopped (runtime shutting down?)".into(),
        };
        self.inner.queue.send(job).await.map_err(|_| gone())?;
        answer
            .await
            .map_err(|_| gone())?
            .map_err(|e| e.in_session(id))
    }

    async fn load(&self, id: &SessionId) -> Result<Option<SessionRecord>> {
        let in_session = |e| map_sqlx(e).in_session(id);
        let mut op = self.db().op().await.map_err(in_session)?;
        let row = sqlx::query(LOAD[self.level_index()])
            .persistent(self.db().persistent())
            .bind(id.as_str())
            .fetch_optional(op.conn())
            .await
            .map_err(in_session)?;
        op.finish().await.map_err(in_session)?;
        row.map(|r| record_from_row(&r, id)).transpose()
    }

    async fn entries(&self, id: &SessionId, after: Seq, limit: usize) -> Result<Vec<Entry>> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let in_session = |e| map_sqlx(e).in_session(id);
        let p = self.db().persistent();
        let mut op = self.db().op().await.map_err(in_session)?;
        let rows = sqlx::query(ENTRIES_SQL)
            .persistent(p)
            .bind(id.as_str())
            .bind(after)
            .bind(limit)
            .fetch_all(op.conn())
            .await
            .map_err(in_session)?;
        if rows.is_empty() {
            let exists: bool = sqlx::query_scalar(EXISTS_SQL)
                .persistent(p)
                .bind(id.as_str())
                .fetch_one(op.conn())
                .await
                .map_err(in_session)?;
            op.finish().await.map_err(in_session)?;
            if !exists {
                return Err(Error::NotFound {
                    session: id.clone(),
                });
            }
            return Ok(Vec::new());
        }
        op.finish().await.map_err(in_session)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(|e| map_sqlx(e).in_session(id))?;
            let payload: &[u8] = row.try_get(1).map_err(|e| map_sqlx(e).in_session(id))?;
            let seq = u64::try_from(seq).map_err(|_| {
                Error::corrupt(Some(id), format!("entry {seq}"), "negative seq in its row")
            })?;
            out.push(codec::decode_entry(payload, id, seq)?);
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
        let p = self.db().persistent();
        let mut op = self.db().op().await.map_err(map_sqlx)?;
        let rows = match owner {
            OwnerFilter::Node(node) => {
                sqlx::query(LIST_NODE)
                    .persistent(p)
                    .bind(node.to_string())
                    .bind(after)
                    .bind(fetch)
                    .fetch_all(op.conn())
                    .await
            }
            OwnerFilter::Any => {
                sqlx::query(LIST_ANY)
                    .persistent(p)
                    .bind(after)
                    .bind(fetch)
                    .fetch_all(op.conn())
                    .await
            }
        }
        .map_err(map_sqlx)?;
        op.finish().await.map_err(map_sqlx)?;
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
        let in_session = |e| map_sqlx(e).in_session(id);
        let p = self.db().persistent();
        let mut op = self.db().op().await.map_err(in_session)?;
        let done = sqlx::query(TERMINAL_SQL)
            .persistent(p)
            .bind(id.as_str())
            .bind(to_i64(epoch, "epoch", id)?)
            .execute(op.conn())
            .await
            .map_err(in_session)?;
        if done.rows_affected() == 1 {
            return op.finish().await.map_err(in_session);
        }
        let row = sqlx::query(WHY_SQL)
            .persistent(p)
            .bind(id.as_str())
            .fetch_optional(op.conn())
            .await
            .map_err(in_session)?;
        op.finish().await.map_err(in_session)?;
        let Some(row) = row else {
            return Err(Error::NotFound {
                session: id.clone(),
            });
        };
        let current: i64 = row.try_get(0).map_err(|e| map_sqlx(e).in_session(id))?;
        let status: String = row.try_get(2).map_err(|e| map_sqlx(e).in_session(id))?;
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
        let in_session = |e| map_sqlx(e).in_session(id);
        let mut op = self.db().op().await.map_err(in_session)?;
        let done = sqlx::query(DELETE_SQL)
            .persistent(self.db().persistent())
            .bind(id.as_str())
            .execute(op.conn())
            .await
            .map_err(in_session)?;
        op.finish().await.map_err(in_session)?;
        Ok(done.rows_affected() > 0)
    }
}
