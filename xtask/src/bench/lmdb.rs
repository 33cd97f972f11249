//! `cargo xtask bench lmdb`: the LMDB store beside raw heed on the same disk, same durability
//! (LMDB's default: `fsync` at every write transaction), measured in the same run.
//!
//! - Single-session commit latency (p50/p99): `LmdbStore::commit` of one entry vs a raw heed
//!   write transaction putting the same four key/values (entry, input index, state, header).
//! - 64 concurrent sessions: commits/s through the store (group commit) vs raw heed putting 64
//!   commits' key/values in ONE write transaction (the best batching can do).
//! - Rehydrate of a 1,000-entry session (`load` + `entries`) p50 vs a raw read transaction
//!   copying the same bytes out (no decoding).
//!
//! Samples of ours and of the baseline alternate (one by one for latency, in rounds for
//! throughput), so a noisy neighbour on the machine hits both sides alike.

use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use normandy_core::codec::{self, BlobKind};
use normandy_core::{
    CommitAck, CommitBatch, Entry, NewSession, NodeId, ResumePolicy, Seq, SessionId, SessionStore,
    TurnState,
};
use normandy_store_lmdb::heed::types::Bytes;
use normandy_store_lmdb::heed::{CommitOrAbort, Database, Env, EnvOpenOptions, WithoutTls};
use normandy_store_lmdb::{LmdbConfig, LmdbStore};

use super::report;
use super::workload::{self, SESSIONS, entry, one_entry_batch, state_after};

const ROUNDS: usize = 10;

pub(crate) fn run(quick: bool) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let dir = tempfile::tempdir()?;
        println!(
            "bench lmdb (heed 0.23, full fsync on both sides, {})",
            dir.path().display()
        );
        let store = LmdbStore::open(LmdbConfig::new(dir.path().join("store")))?;
        let raw = Raw::open(&dir.path().join("raw"))?;
        let node = NodeId::new("bench", 1)?;

        // --- single-session commit latency
        let per_round = if quick { 40 } else { 200 };
        let id = SessionId::new("latency")?;
        store
            .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
            .await?;
        let epoch = store.activate(&id, &node).await?.epoch;
        // One raw sample, then one of ours, and so on: the disk's fsync time drifts a lot on a
        // shared machine, and this way both sides see the same drift.
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for seq in 0..(per_round * ROUNDS) as u64 {
            let r = raw.clone();
            base.push(
                tokio::task::spawn_blocking(move || -> Result<Duration> {
                    let kv = commit_kv("raw-latency", seq);
                    let t = Instant::now();
                    r.put_commits(std::slice::from_ref(&kv))?;
                    Ok(t.elapsed())
                })
                .await??,
            );
            let batch = one_entry_batch(seq)?;
            let t = Instant::now();
            let ack = store.commit(&id, epoch, seq, &batch).await?;
            ours.push(t.elapsed());
            ensure!(
                ack == CommitAck::Applied { seq: seq + 1 },
                "unexpected {ack:?}"
            );
        }
        println!("single-session commit latency, ours vs raw heed put in one write txn each:");
        for (name, p) in [("p50", 0.50), ("p99", 0.99)] {
            report::latency(
                &format!("LmdbStore::commit {name}"),
                report::percentile(&mut ours, p),
                &format!("raw heed write txn {name}"),
                report::percentile(&mut base, p),
            );
        }

        // --- 64 concurrent sessions
        let commits_per_session = if quick { 30 } else { 150 };
        let mut ids = Vec::with_capacity(SESSIONS);
        for i in 0..SESSIONS {
            let id = SessionId::new(format!("conc-{i:02}"))?;
            store
                .create(NewSession::bare(id.clone(), ResumePolicy::Lazy))
                .await?;
            let epoch = store.activate(&id, &node).await?.epoch;
            ids.push((id, epoch));
        }
        let store = Arc::new(store);
        let (mut ours_s, mut base_s) = (Duration::ZERO, Duration::ZERO);
        let (mut ours_n, mut base_n) = (0usize, 0usize);
        let stats_before = store.write_stats();
        let per_round = commits_per_session / ROUNDS.min(commits_per_session);
        let mut next_seq = 0u64;
        for round in 0..ROUNDS {
            // Raw: 64 commits' key/values per write transaction.
            let r = raw.clone();
            let txns = per_round;
            let base_round = round as u64 * txns as u64;
            let elapsed = tokio::task::spawn_blocking(move || -> Result<Duration> {
                let t = Instant::now();
                for k in 0..txns as u64 {
                    let kvs: Vec<CommitKv> = (0..SESSIONS)
                        .map(|s| commit_kv(&format!("raw-conc-{s:02}"), base_round + k))
                        .collect();
                    r.put_commits(&kvs)?;
                }
                Ok(t.elapsed())
            })
            .await??;
            base_s += elapsed;
            base_n += txns * SESSIONS;

            // Ours: {SESSIONS} tasks, each committing `per_round` times in sequence.
            ours_s += workload::commit_concurrently(&store, &ids, next_seq, per_round).await?;
            ours_n += per_round * SESSIONS;
            next_seq += per_round as u64;
        }
        let stats = store.write_stats();
        let txns = stats.transactions - stats_before.transactions;
        println!("{SESSIONS} concurrent sessions, commits/s, ours (group commit) vs raw heed:");
        report::throughput(
            &format!("LmdbStore::commit x{SESSIONS} sessions"),
            ours_n as f64 / ours_s.as_secs_f64(),
            &format!("raw heed, {SESSIONS} commits per txn"),
            base_n as f64 / base_s.as_secs_f64(),
        );
        println!(
            "  (group commit: {ours_n} commits in {txns} write transactions, {:.1} per txn)",
            ours_n as f64 / txns.max(1) as f64
        );

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
        {
            let kvs: Vec<CommitKv> = (0..1000).map(|s| commit_kv("raw-rehydrate", s)).collect();
            let r = raw.clone();
            tokio::task::spawn_blocking(move || r.put_commits(&kvs)).await??;
        }
        let reps = if quick { 50 } else { 200 };
        let (mut ours, mut base, mut decoded) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let r = raw.clone();
            let samples =
                tokio::task::spawn_blocking(move || -> Result<Vec<(Duration, Duration)>> {
                    (0..reps / ROUNDS)
                        .map(|_| {
                            let t = Instant::now();
                            let n = r.read_session("raw-rehydrate", false)?;
                            let copy = t.elapsed();
                            ensure!(n == 1000, "raw rehydrate read {n} entries");
                            let t = Instant::now();
                            let n = r.read_session("raw-rehydrate", true)?;
                            ensure!(n == 1000, "raw rehydrate decoded {n} entries");
                            Ok((copy, t.elapsed()))
                        })
                        .collect()
                })
                .await??;
            base.extend(samples.iter().map(|s| s.0));
            decoded.extend(samples.iter().map(|s| s.1));
            for _ in 0..reps / ROUNDS {
                ours.push(workload::rehydrate_once(&*store, &id).await?);
            }
        }
        println!("rehydrate a 1,000-entry session (load + entries), ours (decoded) vs raw bytes:");
        report::latency(
            "LmdbStore load + entries p50",
            report::percentile(&mut ours, 0.5),
            "raw heed read txn copy p50",
            report::percentile(&mut base, 0.5),
        );
        report::latency(
            "LmdbStore load + entries p50",
            report::percentile(&mut ours, 0.5),
            "raw heed read + codec::decode p50",
            report::percentile(&mut decoded, 0.5),
        );
        Ok(())
    })
}

/// The key/values one commit of one entry writes: entry, input index, state, header.
struct CommitKv {
    kvs: [(Vec<u8>, Vec<u8>); 4],
}

fn commit_kv(session: &str, expected: Seq) -> CommitKv {
    let seq = expected + 1;
    let entry_blob = codec::encode(BlobKind::Entry, &entry(seq)).expect("encode entry");
    let state = state_after(seq).expect("state");
    let state_blob = codec::encode(BlobKind::TurnState, &state).expect("encode state");
    let mut entry_key = session.as_bytes().to_vec();
    entry_key.push(0);
    entry_key.extend_from_slice(&seq.to_be_bytes());
    let mut input_key = session.as_bytes().to_vec();
    input_key.push(0);
    input_key.extend_from_slice(format!("input-{seq}").as_bytes());
    // A header of the size the store writes (epoch, seq, owner, status, policy, times).
    let header = codec::encode(
        BlobKind::Other,
        &(1u64, seq, "bench#1", "active", "lazy", 0u64),
    )
    .expect("encode header");
    CommitKv {
        kvs: [
            (entry_key, entry_blob),
            (input_key, seq.to_be_bytes().to_vec()),
            (session.as_bytes().to_vec(), state_blob),
            (session.as_bytes().to_vec(), header),
        ],
    }
}

/// Raw heed on its own environment: four databases like the store's.
#[derive(Clone)]
struct Raw {
    env: Env<WithoutTls>,
    entries: Database<'static, Bytes, Bytes>,
    inputs: Database<'static, Bytes, Bytes>,
    states: Database<'static, Bytes, Bytes>,
    sessions: Database<'static, Bytes, Bytes>,
}

impl Raw {
    fn open(path: &std::path::Path) -> Result<Self> {
        std::fs::create_dir_all(path)?;
        // SAFETY: a fresh directory that only this benchmark maps, default (safe) flags.
        #[allow(unsafe_code)]
        let env = unsafe {
            EnvOpenOptions::new()
                .read_txn_without_tls()
                .map_size(1 << 30)
                .max_dbs(8)
                .open(path)?
        };
        let wtxn = env.write_txn()?;
        let (entries, inputs, states, sessions) = env
            .create_databases_and_commit(
                wtxn,
                |dbo, wtxn| -> normandy_store_lmdb::heed::Result<_> {
                    Ok(CommitOrAbort::<_, ()>::Commit((
                        dbo.create_database::<Bytes, Bytes>(wtxn, Some("entries"))?,
                        dbo.create_database::<Bytes, Bytes>(wtxn, Some("inputs"))?,
                        dbo.create_database::<Bytes, Bytes>(wtxn, Some("states"))?,
                        dbo.create_database::<Bytes, Bytes>(wtxn, Some("sessions"))?,
                    )))
                },
            )?
            .unwrap_commit();
        Ok(Self {
            env,
            entries,
            inputs,
            states,
            sessions,
        })
    }

    /// One write transaction holding every commit of `commits`.
    fn put_commits(&self, commits: &[CommitKv]) -> Result<()> {
        let mut wtxn = self.env.write_txn()?;
        for c in commits {
            let [e, i, s, h] = &c.kvs;
            self.entries.put(&mut wtxn, &e.0, &e.1)?;
            self.inputs.put(&mut wtxn, &i.0, &i.1)?;
            self.states.put(&mut wtxn, &s.0, &s.1)?;
            self.sessions.put(&mut wtxn, &h.0, &h.1)?;
        }
        wtxn.commit()?;
        Ok(())
    }

    /// Header, state and every entry of `session`, copied out of one read transaction (and
    /// decoded with the codec if `decode`).
    fn read_session(&self, session: &str, decode: bool) -> Result<usize> {
        let rtxn = self.env.read_txn()?;
        let header = self
            .sessions
            .get(&rtxn, session.as_bytes())?
            .map(<[u8]>::to_vec);
        let state = self
            .states
            .get(&rtxn, session.as_bytes())?
            .map(<[u8]>::to_vec);
        ensure!(header.is_some() && state.is_some(), "raw session missing");
        let mut lo = session.as_bytes().to_vec();
        lo.push(0);
        let mut hi = session.as_bytes().to_vec();
        hi.push(1);
        let range = (Bound::Included(&lo[..]), Bound::Excluded(&hi[..]));
        if decode {
            let state: TurnState = codec::decode(BlobKind::TurnState, &state.unwrap(), None)?;
            let mut out: Vec<Entry> = Vec::with_capacity(1000);
            for item in self.entries.range(&rtxn, &range)? {
                out.push(codec::decode(BlobKind::Entry, item?.1, None)?);
            }
            ensure!(state.queued.len() == 1, "raw state");
            return Ok(out.len());
        }
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(1000);
        for item in self.entries.range(&rtxn, &range)? {
            out.push(item?.1.to_vec());
        }
        Ok(out.len())
    }
}
