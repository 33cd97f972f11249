//! `cargo xtask bench postgres`: the Postgres store beside raw sqlx on the same server, the same
//! schema and the same connection settings (pool of 16, same search_path), measured in the same
//! run. The server comes from `DATABASE_URL`, else `NORMANDY_TEST_DATABASE_URL`, else
//! `postgres://postgres@127.0.0.1:5432/test`; the bench works in a schema of its own and drops it.
//!
//! - Single-session commit latency (p50/p99): `PgStore::commit` of one entry vs a raw sqlx
//!   transaction doing the same fenced `UPDATE` of the session row and `INSERT` of the same
//!   entry bytes (BEGIN, UPDATE, INSERT, COMMIT).
//! - 64 concurrent sessions: total commits/s through the store (group commit) vs the best raw
//!   client of the same shape: each step, every session's commit written by one `UNNEST`ed
//!   statement (the same fenced `UPDATE`, input-id guard and `INSERT` as the store's group
//!   statement), in chunks under the same 12 KiB message limit, the chunks on parallel
//!   connections. Also beside 64 tasks each running the raw transaction per commit.
//! - Poolers: the 64-session workload and single-commit latency with `pooler=transaction`
//!   (unnamed statements, one explicit transaction per operation) directly, and through the
//!   PgBouncer of `NORMANDY_TEST_PGBOUNCER_URL` (`.ci/pgbouncer.sh`), beside the default.
//! - Rehydrate of a 1,000-entry session (`load` + `entries`, decoded) p50 vs raw sqlx fetching
//!   the same row and 1,000 payloads (not decoded).
//!
//! Samples of ours and of the baseline are taken in alternating rounds, so a noisy neighbour
//! on the machine hits both sides alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    CommitAck, CommitBatch, Entry, NewSession, NodeId, ResumePolicy, Seq, SessionId, SessionStore,
};
use normandy_store_postgres::{PgStore, PgStoreConfig, PoolerMode, migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::report;
use super::workload::{self, SESSIONS, entry, one_entry_batch, state_after};

const ROUNDS: usize = 4;
const POOL: u32 = 16;
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub(crate) fn run(quick: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let url = std::env::var("DATABASE_URL")
            .or_else(|_| std::env::var("NORMANDY_TEST_DATABASE_URL"))
            .unwrap_or_else(|_| DEFAULT_URL.to_string());
        let base_opts: PgConnectOptions = url.parse().context("invalid database URL")?;
        let schema = format!("bench_{}", std::process::id());
        let root = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(base_opts.clone())
            .await
            .context("connecting to Postgres (set DATABASE_URL)")?;
        // The schema name is made here from a number: safe to splice.
        for sql in [
            format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
            format!("CREATE SCHEMA {schema}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&root).await?;
        }
        let result = bench(&base_opts, &schema, quick).await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&root)
        .await?;
        result
    })
}

async fn bench(base_opts: &PgConnectOptions, schema: &str, quick: bool) -> Result<()> {
    let opts = base_opts
        .clone()
        .application_name("normandy")
        .options([("search_path", schema)]);
    let raw = PgPoolOptions::new()
        .max_connections(POOL)
        .connect_with(opts.clone())
        .await?;
    migrator().run(&raw).await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&raw)
        .await?;
    let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&raw)
        .await?;
    println!(
        "bench postgres (server {version}, synchronous_commit={sync}, pool of {POOL} on both sides, schema {schema})"
    );
    let store = Arc::new(
        PgStore::connect(
            PgStoreConfig::from_options(opts.clone())
                .max_connections(POOL)
                .schema(schema)?,
        )
        .await?,
    );
    let node = NodeId::new("bench", 1)?;

    // --- single-session commit latency
    let per_round = if quick { 100 } else { 500 };
    let id = SessionId::new("latency")?;
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await?;
    let epoch = store.activate(&id, &node).await?.epoch;
    let raw_id = raw_session(&store, &node, "raw-latency").await?;
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    let (mut seq, mut raw_seq) = (0u64, 0u64);
    for _ in 0..ROUNDS {
        for _ in 0..per_round {
            let c = RawCommit::new(&raw_id, raw_seq)?;
            let t = Instant::now();
            c.write(&raw).await?;
            base.push(t.elapsed());
            raw_seq += 1;
        }
        for _ in 0..per_round {
            let batch = one_entry_batch(seq)?;
            let t = Instant::now();
            let ack = store.commit(&id, epoch, seq, &batch).await?;
            ours.push(t.elapsed());
            ensure!(
                ack == CommitAck::Applied { seq: seq + 1 },
                "unexpected {ack:?}"
            );
            seq += 1;
        }
    }
    println!("single-session commit latency, ours vs a raw sqlx transaction (UPDATE + INSERT):");
    for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
        report::latency(
            &format!("PgStore::commit {name}"),
            report::percentile(&mut ours, p),
            &format!("raw sqlx txn {name}"),
            report::percentile(&mut base, p),
        );
    }

    // --- 64 concurrent sessions
    let commits_per_session = if quick { 40 } else { 200 };
    let per_round = commits_per_session / ROUNDS;
    let mut ids = Vec::with_capacity(SESSIONS);
    let mut raw_ids = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let id = SessionId::new(format!("conc-{i:02}"))?;
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await?;
        let epoch = store.activate(&id, &node).await?.epoch;
        ids.push((id, epoch));
        raw_ids.push(raw_session(&store, &node, &format!("raw-conc-{i:02}")).await?);
    }
    let mut batch_ids = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        batch_ids.push(raw_session(&store, &node, &format!("raw-batch-{i:02}")).await?);
    }
    let (mut ours_s, mut base_s, mut batch_s) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut ours_n, mut base_n) = (0usize, 0usize);
    let mut next_seq = 0u64;
    let stats_before = store.write_stats();
    for _ in 0..ROUNDS {
        // Raw: 64 tasks, one transaction per commit.
        let t = Instant::now();
        let tasks: Vec<_> = raw_ids
            .iter()
            .cloned()
            .map(|rid| {
                let raw = raw.clone();
                let first = next_seq;
                tokio::spawn(async move {
                    for s in first..first + per_round as u64 {
                        RawCommit::new(&rid, s)?.write(&raw).await?;
                    }
                    Ok::<_, anyhow::Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        base_s += t.elapsed();
        base_n += per_round * SESSIONS;

        // Raw batched: per step, every session's commit in UNNEST statements.
        let t = Instant::now();
        for s in next_seq..next_seq + per_round as u64 {
            raw_batch_step(&raw, &batch_ids, s).await?;
        }
        batch_s += t.elapsed();

        // Ours: {SESSIONS} tasks, each committing `per_round` times in sequence.
        ours_s += workload::commit_concurrently(&store, &ids, next_seq, per_round).await?;
        ours_n += per_round * SESSIONS;
        next_seq += per_round as u64;
    }
    println!("{SESSIONS} concurrent sessions, commits/s, ours (group commit) vs raw sqlx:");
    report::throughput(
        &format!("PgStore::commit x{SESSIONS} sessions"),
        ours_n as f64 / ours_s.as_secs_f64(),
        &format!("raw UNNEST batch x{SESSIONS} per step"),
        base_n as f64 / batch_s.as_secs_f64(),
    );
    report::throughput(
        &format!("PgStore::commit x{SESSIONS} sessions"),
        ours_n as f64 / ours_s.as_secs_f64(),
        &format!("raw sqlx txn per commit x{SESSIONS}"),
        base_n as f64 / base_s.as_secs_f64(),
    );
    let stats = store.write_stats();
    let (statements, commits) = (
        stats.statements - stats_before.statements,
        stats.commits - stats_before.commits,
    );
    println!(
        "  (group commit: {commits} commits in {statements} statements, {:.1} per statement)",
        commits as f64 / statements.max(1) as f64
    );

    pooler_cost(base_opts, schema, &store, &node, quick).await?;

    // --- rehydrate a 1,000-entry session
    let id = SessionId::new("rehydrate")?;
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await?;
    let epoch = store.activate(&id, &node).await?.epoch;
    for chunk in 0..10u64 {
        let entries: Vec<Entry> = (1..=100).map(|i| entry(chunk * 100 + i)).collect();
        let state = state_after(chunk * 100 + 100)?;
        store
            .commit(&id, epoch, chunk * 100, &CommitBatch { entries, state })
            .await?;
    }
    let reps = if quick { 100 } else { 400 };
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for _ in 0..reps / ROUNDS {
            let t = Instant::now();
            let n = raw_read(&raw, "rehydrate").await?;
            base.push(t.elapsed());
            ensure!(n == 1000, "raw rehydrate read {n} entries");
        }
        for _ in 0..reps / ROUNDS {
            ours.push(workload::rehydrate_once(&*store, &id).await?);
        }
    }
    println!("rehydrate a 1,000-entry session (load + entries), ours (decoded) vs raw bytes:");
    report::latency(
        "PgStore load + entries p50",
        report::percentile(&mut ours, 0.5),
        "raw sqlx row + 1,000 payloads p50",
        report::percentile(&mut base, 0.5),
    );
    Ok(())
}

/// A session for the raw side, created and activated through the store so its row is the same.
async fn raw_session(store: &PgStore, node: &NodeId, name: &str) -> Result<(String, i64)> {
    let id = SessionId::new(name)?;
    store
        .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
        .await?;
    let epoch = store.activate(&id, node).await?.epoch;
    Ok((name.to_string(), i64::try_from(epoch)?))
}

/// What the raw side writes for one commit: the same bytes the store writes.
struct RawCommit<'a> {
    id: &'a str,
    epoch: i64,
    expected: i64,
    state: Vec<u8>,
    payload: Vec<u8>,
    input: String,
}

impl<'a> RawCommit<'a> {
    fn new(session: &'a (String, i64), expected: Seq) -> Result<Self> {
        let seq = expected + 1;
        Ok(Self {
            id: &session.0,
            epoch: session.1,
            expected: i64::try_from(expected)?,
            state: codec::encode(BlobKind::TurnState, &state_after(seq)?)?,
            payload: codec::encode(BlobKind::Entry, &entry(seq))?,
            input: format!("input-{seq}"),
        })
    }

    /// BEGIN; the fenced UPDATE; the INSERT; COMMIT.
    async fn write(&self, pool: &PgPool) -> Result<()> {
        let mut tx = pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE normandy_sessions SET seq = $4, turn_state = $5, updated_at = now() \
             WHERE id = $1 AND epoch = $2 AND seq = $3 AND status = 'active'",
        )
        .bind(self.id)
        .bind(self.epoch)
        .bind(self.expected)
        .bind(self.expected + 1)
        .bind(&self.state)
        .execute(&mut *tx)
        .await?;
        ensure!(updated.rows_affected() == 1, "raw commit was not applied");
        sqlx::query(
            "INSERT INTO normandy_entries (session_id, seq, parent, kind, input_id, payload) \
             VALUES ($1, $2, $3, 'input', $4, $5)",
        )
        .bind(self.id)
        .bind(self.expected + 1)
        .bind((self.expected > 0).then_some(self.expected))
        .bind(&self.input)
        .bind(&self.payload)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// The raw group statement: the store's shape (fenced `UPDATE` of each session row from
/// `UNNEST`ed arrays, unless one of its input ids is stored; `INSERT` of the entries of the
/// rows it updated), written by hand.
const RAW_GROUP_SQL: &str = "WITH c AS ( \
        SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bytea[]) \
            AS c(id, epoch, expected_seq, state) \
     ), e AS ( \
        SELECT * FROM UNNEST($1::text[], $5::bigint[], $6::bigint[], $7::text[], $8::bytea[]) \
            AS e(session_id, seq, parent, input_id, payload) \
     ), dup AS ( \
        SELECT DISTINCT x.session_id FROM normandy_entries x \
          JOIN e ON x.session_id = e.session_id AND x.input_id = e.input_id \
     ), upd AS ( \
        UPDATE normandy_sessions s SET seq = c.expected_seq + 1, turn_state = c.state, \
               updated_at = now() \
          FROM c \
         WHERE s.id = c.id AND s.epoch = c.epoch AND s.seq = c.expected_seq \
           AND s.status = 'active' \
           AND NOT EXISTS (SELECT 1 FROM dup WHERE dup.session_id = c.id) \
        RETURNING s.id \
     ), ins AS ( \
        INSERT INTO normandy_entries (session_id, seq, parent, kind, input_id, payload) \
        SELECT e.session_id, e.seq, e.parent, 'input', e.input_id, e.payload \
          FROM e JOIN upd ON upd.id = e.session_id \
     ) \
     SELECT count(*) FROM upd";

/// Most sessions per raw group statement: ~400 bytes a commit keeps a chunk under the 12 KiB
/// the store's batches are held to (sqlx leaves Nagle on; see `PgStoreConfig::max_batch_bytes`).
const RAW_CHUNK: usize = 28;

/// One step of the raw batched client: every session's commit on top of `expected`, in chunks
/// of [`RAW_CHUNK`] sessions, the chunks at once on their own connections.
async fn raw_batch_step(pool: &PgPool, sessions: &[(String, i64)], expected: Seq) -> Result<()> {
    let seq = expected + 1;
    let state = codec::encode(BlobKind::TurnState, &state_after(seq)?)?;
    let payload = codec::encode(BlobKind::Entry, &entry(seq))?;
    let input = format!("input-{seq}");
    let expected = i64::try_from(expected)?;
    let chunks = sessions.chunks(RAW_CHUNK).map(|chunk| {
        let (ids, epochs): (Vec<&str>, Vec<i64>) =
            chunk.iter().map(|(id, e)| (id.as_str(), *e)).unzip();
        let n = chunk.len();
        let (state, payload, input) = (&state, &payload, &input);
        async move {
            let applied: i64 = sqlx::query_scalar(RAW_GROUP_SQL)
                .bind(&ids)
                .bind(&epochs)
                .bind(vec![expected; n])
                .bind(vec![state.as_slice(); n])
                .bind(vec![expected + 1; n])
                .bind(vec![(expected > 0).then_some(expected); n])
                .bind(vec![input.as_str(); n])
                .bind(vec![payload.as_slice(); n])
                .fetch_one(pool)
                .await?;
            ensure!(applied == n as i64, "raw batch applied {applied} of {n}");
            Ok::<_, anyhow::Error>(())
        }
    });
    for r in futures::future::join_all(chunks).await {
        r?;
    }
    Ok(())
}

/// What `pooler=transaction` costs: the 64-session workload and single-commit latency with the
/// default (named, cached statements), with `pooler=transaction` directly, and through the
/// PgBouncer of `NORMANDY_TEST_PGBOUNCER_URL` when it is set.
async fn pooler_cost(
    direct: &PgConnectOptions,
    schema: &str,
    named: &Arc<PgStore>,
    node: &NodeId,
    quick: bool,
) -> Result<()> {
    let config =
        |c: PgStoreConfig| -> Result<PgStoreConfig> { Ok(c.max_connections(POOL).schema(schema)?) };
    let unnamed = Arc::new(
        PgStore::connect(config(
            PgStoreConfig::from_options(direct.clone()).pooler(PoolerMode::Transaction),
        )?)
        .await?,
    );
    let bouncer = match std::env::var("NORMANDY_TEST_PGBOUNCER_URL") {
        Ok(url) if !url.is_empty() => Some(Arc::new(
            PgStore::connect(config(
                PgStoreConfig::new(&url)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .pooler(PoolerMode::Transaction),
            )?)
            .await?,
        )),
        _ => None,
    };
    let mut sides: Vec<(&str, Arc<PgStore>)> = vec![
        ("direct, named statements (default)", named.clone()),
        ("direct, pooler=transaction", unnamed),
    ];
    if let Some(b) = bouncer {
        sides.push(("PgBouncer, pooler=transaction", b));
    }
    let commits_per_session = if quick { 40 } else { 120 };
    let per_round = commits_per_session / ROUNDS;
    let latency_per_round = if quick { 50 } else { 200 };
    let mut ids: Vec<Vec<(SessionId, u64)>> = Vec::new();
    for (k, _) in sides.iter().enumerate() {
        let mut v = Vec::with_capacity(SESSIONS + 1);
        for i in 0..=SESSIONS {
            let id = SessionId::new(format!("pooler-{k}-{i:02}"))?;
            named
                .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
                .await?;
            v.push((id.clone(), named.activate(&id, node).await?.epoch));
        }
        ids.push(v);
    }
    let mut elapsed = vec![Duration::ZERO; sides.len()];
    let mut lat: Vec<Vec<Duration>> = vec![Vec::new(); sides.len()];
    let mut next = 0u64;
    let mut lat_next = 0u64;
    for _ in 0..ROUNDS {
        for (k, (_, store)) in sides.iter().enumerate() {
            elapsed[k] +=
                workload::commit_concurrently(store, &ids[k][..SESSIONS], next, per_round).await?;
            let (id, epoch) = &ids[k][SESSIONS];
            for s in lat_next..lat_next + latency_per_round as u64 {
                let batch = one_entry_batch(s)?;
                let t = Instant::now();
                store.commit(id, *epoch, s, &batch).await?;
                lat[k].push(t.elapsed());
            }
        }
        next += per_round as u64;
        lat_next += latency_per_round as u64;
    }
    println!(
        "poolers: the store with pooler=transaction (unnamed statements, a transaction per operation):"
    );
    let base = (SESSIONS * per_round * ROUNDS) as f64 / elapsed[0].as_secs_f64();
    let base_p50 = report::percentile(&mut lat[0].clone(), 0.5);
    for (k, (name, _)) in sides.iter().enumerate() {
        let rate = (SESSIONS * per_round * ROUNDS) as f64 / elapsed[k].as_secs_f64();
        report::throughput(&format!("{name} x{SESSIONS}"), rate, "direct, named", base);
        report::latency(
            &format!("{name} commit p50"),
            report::percentile(&mut lat[k], 0.5),
            "direct, named p50",
            base_p50,
        );
    }
    if sides.len() < 3 {
        println!("  (PgBouncer: set NORMANDY_TEST_PGBOUNCER_URL, e.g. after .ci/pgbouncer.sh)");
    }
    Ok(())
}

/// The session row and every entry payload, as bytes.
async fn raw_read(pool: &PgPool, id: &str) -> Result<usize> {
    let row: (i64, i64, Vec<u8>) =
        sqlx::query_as("SELECT epoch, seq, turn_state FROM normandy_sessions WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?;
    ensure!(!row.2.is_empty(), "raw session missing");
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM normandy_entries WHERE session_id = $1 AND seq > 0 \
         ORDER BY seq LIMIT 1000",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(payloads.len())
}
