//! The Postgres half of `cargo xtask bench cluster`: what tier 2p's node leases cost the
//! database — write rate and WAL per heartbeat — beside the same heartbeat on a table that
//! indexes its expiry column (what the schema avoids), measured in the same run.
//!
//! WAL is counted with `pg_current_wal_lsn()` before and after a batch of heartbeats, so the
//! figure holds only on an otherwise idle server: point `NORMANDY_BENCH_DATABASE_URL` at one
//! (a private `initdb` on another port will do).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use normandy_core::{Member, Membership, NodeId};
use normandy_registry_postgres::{PgMembership, PgRegistryConfig};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};

use super::report;

/// Nodes the cost is given for.
const NODES: usize = 100;
/// The default lease TTL; a node refreshes every third of it.
const TTL: Duration = Duration::from_millis(1500);

/// The database the Postgres benches use.
pub(super) fn database_url() -> String {
    std::env::var("NORMANDY_BENCH_DATABASE_URL")
        .or_else(|_| std::env::var("NORMANDY_TEST_DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn admin(url: &str) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .with_context(|| "connect to the bench database".to_string())
}

/// Creates a fresh schema `bench_<tag>_<pid>` and returns its name.
pub(super) async fn fresh_schema(url: &str, tag: &str) -> Result<String> {
    let name = format!("bench_{tag}_{}", std::process::id());
    let pool = admin(url).await?;
    // Built here from a tag and a pid: safe to splice.
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {name} CASCADE"
    )))
    .execute(&pool)
    .await?;
    sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {name}")))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(name)
}

/// Drops a bench schema.
pub(super) async fn drop_schema(url: &str, name: &str) -> Result<()> {
    let pool = admin(url).await?;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {name} CASCADE"
    )))
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}

async fn lsn(pool: &PgPool) -> Result<String> {
    Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await?)
}

async fn wal_since(pool: &PgPool, from: &str) -> Result<f64> {
    Ok(
        sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::float8")
            .bind(from)
            .fetch_one(pool)
            .await?,
    )
}

/// Updates and HOT updates of `table` so far, once the statistics show at least `min` updates
/// (backends report them within about a second of going idle).
async fn updates(pool: &PgPool, schema: &str, table: &str, min: i64) -> Result<(i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let row = sqlx::query(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname = $2",
        )
        .bind(schema)
        .bind(table)
        .fetch_one(pool)
        .await?;
        let (upd, hot): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if upd >= min || Instant::now() > deadline {
            return Ok((upd, hot));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `rounds` heartbeats of every node through `beat`; returns (WAL bytes per beat, p50 latency).
async fn measure<F, Fut>(pool: &PgPool, rounds: usize, mut beat: F) -> Result<(f64, Duration)>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    // One round first: every page touched since the last checkpoint, so no full-page image
    // (once per page per checkpoint, a few KB every 5 minutes) lands in the figure.
    for i in 0..NODES {
        beat(i).await?;
    }
    let from = lsn(pool).await?;
    let mut samples = Vec::with_capacity(rounds * NODES);
    for _ in 0..rounds {
        for i in 0..NODES {
            let t = Instant::now();
            beat(i).await?;
            samples.push(t.elapsed());
        }
    }
    let wal = wal_since(pool, &from).await?;
    Ok((
        wal / (rounds * NODES) as f64,
        report::percentile(&mut samples, 0.5),
    ))
}

/// The heartbeat's WAL and write rate for 100 nodes, beside a heartbeat table with an index on
/// its expiry.
pub(super) async fn heartbeat_wal(url: &str, quick: bool) -> Result<()> {
    let rounds = if quick { 20 } else { 100 };
    let schema = fresh_schema(url, "heartbeat").await?;
    let config = PgRegistryConfig::new(url)?
        .schema(&schema)?
        .migrate_on_open(true)
        .max_connections(1);
    let membership = PgMembership::connect(config).await?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(
            url.parse::<sqlx::postgres::PgConnectOptions>()?
                .options([("search_path", schema.as_str())]),
        )
        .await?;
    let members: Vec<Member> = (0..NODES)
        .map(|i| {
            Ok(Member {
                node: NodeId::with_fresh_incarnation(format!("node-{i:03}"))?,
                address: format!("10.0.{}.{}:7100", i / 250, i % 250 + 1),
            })
        })
        .collect::<Result<_>>()?;
    for m in &members {
        membership.join(m, Duration::from_secs(3600)).await?;
    }
    // The baseline table: the same rows, the same raw UPDATE, plus an index on the expiry.
    sqlx::query(
        "CREATE TABLE hb_indexed (LIKE normandy_node_leases INCLUDING ALL) WITH (fillfactor = 50)",
    )
    .execute(&pool)
    .await?;
    sqlx::query("CREATE INDEX hb_indexed_expires_at_idx ON hb_indexed (expires_at)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO hb_indexed SELECT * FROM normandy_node_leases")
        .execute(&pool)
        .await?;
    let raw = |table: &'static str| {
        let (pool, members) = (pool.clone(), members.clone());
        move |i: usize| {
            let (pool, m) = (pool.clone(), members[i].clone());
            async move {
                let sql = format!(
                    "UPDATE {table} SET expires_at = now() + make_interval(secs => $4) \
                     WHERE name = $1 AND incarnation = $2 AND address = $3 AND expires_at > now()"
                );
                let done = sqlx::query(AssertSqlSafe(sql))
                    .bind(m.node.name())
                    .bind(m.node.incarnation() as i64)
                    .bind(&m.address)
                    .bind(TTL.as_secs_f64())
                    .execute(&pool)
                    .await?;
                ensure!(done.rows_affected() == 1, "a raw heartbeat found no lease");
                Ok(())
            }
        }
    };
    let (ours, ours_p50) = measure(&pool, rounds, |i| {
        let (membership, m) = (membership.clone(), members[i].clone());
        async move {
            let status = membership.refresh(&m, TTL).await?;
            ensure!(status == normandy_core::LeaseStatus::Held, "lease lost");
            Ok(())
        }
    })
    .await?;
    let (plain, plain_p50) = measure(&pool, rounds, raw("normandy_node_leases")).await?;
    let (indexed, indexed_p50) = measure(&pool, rounds, raw("hb_indexed")).await?;
    let beats = ((rounds + 1) * NODES * 2) as i64;
    let (upd, hot) = updates(&pool, &schema, "normandy_node_leases", beats).await?;
    let (iupd, ihot) = updates(&pool, &schema, "hb_indexed", ((rounds + 1) * NODES) as i64).await?;

    let per_s = NODES as f64 * 3.0 / TTL.as_secs_f64();
    let per_day = |bytes: f64| bytes * per_s * 86_400.0 / 1e9;
    println!(
        "  heartbeat, {NODES} nodes at TTL {} ms (a refresh every {} ms): {per_s:.0} writes/s",
        TTL.as_millis(),
        (TTL / 3).as_millis()
    );
    println!(
        "  {:<44} {:>10.0} B    {:<34} {:>10.0} B    ratio {:.2}",
        "WAL per heartbeat (ours, no index on expiry)",
        ours,
        "raw UPDATE, expiry indexed",
        indexed,
        ours / indexed
    );
    println!(
        "  {:<44} {:>10.0} B    {:<34} {:>10.0} B    ratio {:.2}",
        "",
        ours,
        "raw UPDATE, same table",
        plain,
        ours / plain
    );
    println!(
        "  {:<44} {:>10.2} GB   {:<34} {:>10.2} GB",
        "WAL per day, 100 nodes",
        per_day(ours),
        "expiry indexed",
        per_day(indexed)
    );
    report::latency(
        "heartbeat p50 (PgMembership::refresh)",
        ours_p50,
        "raw sqlx UPDATE, same table",
        plain_p50,
    );
    println!(
        "  {:<44} {:>10.1} µs",
        "raw UPDATE p50, expiry indexed",
        indexed_p50.as_secs_f64() * 1e6
    );
    println!(
        "  HOT updates: {hot} of {upd} on the lease table ({:.0}%), {ihot} of {iupd} with the \
         expiry indexed ({:.0}%)",
        100.0 * hot as f64 / upd.max(1) as f64,
        100.0 * ihot as f64 / iupd.max(1) as f64
    );
    pool.close().await;
    drop(membership);
    drop_schema(url, &schema).await
}
