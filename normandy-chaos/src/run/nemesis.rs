//! The nemesis: a fault schedule drawn from the seed (same seed, same schedule), and the
//! faults themselves, one at a time, each healed before the next.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::backend::{RedisPair, Tier, terminate_backends};
use super::procs::{Link, Proc};
use crate::proxy::Fault as LinkFault;

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum FaultKind {
    /// SIGKILL of a process, restarted after `hold`.
    Kill,
    /// SIGSTOP of a process for `hold` (past its lease), then SIGCONT.
    Pause,
    /// A link dark both ways for `hold`, connections left open.
    Blackhole(Link),
    /// A link's bytes held `delay` each way for `hold`.
    Delay(Link),
    /// Every connection of a link reset (RST).
    Reset(Link),
    /// `pg_terminate_backend` of every Postgres connection of a process.
    PgTerminate,
    /// SIGKILL of the Redis primary and a restart from its AOF.
    RedisRestart,
    /// SIGKILL of the Redis primary and promotion of its replica.
    RedisFailover,
    /// SIGSTOP of the Redis replica for `hold` (WAIT cannot be met meanwhile).
    ReplicaPause,
    /// SIGSTOP of the Redis replica for `hold`, then SIGKILL of the primary and promotion of
    /// the stale replica: what was written meanwhile is gone. With WAIT none of it was
    /// acknowledged; without, the checker must report the acknowledged writes lost.
    StaleFailover,
}

impl FaultKind {
    /// The name in the run's table.
    pub(crate) fn name(self) -> String {
        let link = |l: Link| format!("{l:?}").to_lowercase();
        match self {
            FaultKind::Kill => "kill".into(),
            FaultKind::Pause => "pause".into(),
            FaultKind::Blackhole(l) => format!("blackhole-{}", link(l)),
            FaultKind::Delay(l) => format!("delay-{}", link(l)),
            FaultKind::Reset(l) => format!("reset-{}", link(l)),
            FaultKind::PgTerminate => "pg-terminate".into(),
            FaultKind::RedisRestart => "redis-restart".into(),
            FaultKind::RedisFailover => "redis-failover".into(),
            FaultKind::ReplicaPause => "replica-pause".into(),
            FaultKind::StaleFailover => "stale-failover".into(),
        }
    }
}

/// One scheduled fault.
#[derive(Clone, Debug)]
pub(crate) struct Fault {
    /// Quiet time before it.
    pub(crate) gap: Duration,
    pub(crate) kind: FaultKind,
    /// The process it hits (where it hits one).
    pub(crate) target: usize,
    /// How long it lasts.
    pub(crate) hold: Duration,
    /// The delay of a `Delay`.
    pub(crate) delay: Duration,
}

/// The faults a tier can suffer.
fn kinds(tier: Tier) -> Vec<FaultKind> {
    use FaultKind::*;
    // Kills weigh most: a process dying mid-turn is the fault users meet most.
    let mut k = vec![Kill, Kill, Kill, Pause, Pause];
    let mut links = Vec::new();
    if tier.uses_postgres() {
        links.push(Link::Postgres);
        k.push(PgTerminate);
    }
    if tier.uses_redis() {
        links.push(Link::Redis);
    }
    if tier.is_cluster() {
        links.push(Link::Peer);
    }
    for l in links {
        k.extend([Blackhole(l), Delay(l), Reset(l)]);
    }
    if tier == Tier::RedisStore {
        k.extend([RedisRestart, RedisFailover, ReplicaPause, StaleFailover]);
    }
    k
}

/// The schedule of `n` faults for `tier` on `procs` processes, from `seed` alone.
pub(crate) fn schedule(
    tier: Tier,
    procs: usize,
    n: usize,
    seed: u64,
    lease: Duration,
) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let kinds = kinds(tier);
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
    (0..n)
        .map(|_| {
            let kind = kinds[rng.random_range(0..kinds.len())];
            let hold = match kind {
                FaultKind::Kill => ms(&mut rng, 0, 1500),
                // Past the lease, so another node may take the sessions over meanwhile.
                FaultKind::Pause => lease + ms(&mut rng, 300, 2000),
                FaultKind::Blackhole(_) | FaultKind::ReplicaPause | FaultKind::StaleFailover => {
                    ms(&mut rng, 300, 3000)
                }
                FaultKind::Delay(_) => ms(&mut rng, 300, 2000),
                _ => Duration::ZERO,
            };
            Fault {
                gap: ms(&mut rng, 50, 600),
                kind,
                target: rng.random_range(0..procs),
                hold,
                delay: ms(&mut rng, 10, 400),
            }
        })
        .collect()
}

/// What the nemesis did.
#[derive(Debug, Default)]
pub(crate) struct NemesisLog {
    /// Faults injected, by name.
    pub(crate) by_kind: BTreeMap<String, usize>,
    /// Postgres backends terminated.
    pub(crate) terminated: u64,
    /// Faults whose injection or healing failed (the run goes on; the table shows them).
    pub(crate) errors: Vec<String>,
}

/// The parts of the run a fault acts on.
pub(crate) struct World {
    pub(crate) procs: Vec<Proc>,
    pub(crate) redis: Option<RedisPair>,
    pub(crate) pg: Option<sqlx::PgPool>,
}

impl World {
    /// Injects `f`, waits its hold, and heals it.
    pub(crate) async fn inject(&mut self, f: &Fault, log: &mut NemesisLog) {
        let result = self.apply(f, log).await;
        *log.by_kind.entry(f.kind.name()).or_insert(0) += 1;
        if let Err(e) = result {
            log.errors.push(format!("{}: {e:#}", f.kind.name()));
            // Each fault healed before the next, even one that failed half-way.
            if let Err(e) = self.heal().await {
                log.errors
                    .push(format!("healing after {}: {e:#}", f.kind.name()));
            }
        }
    }

    async fn apply(&mut self, f: &Fault, log: &mut NemesisLog) -> anyhow::Result<()> {
        let target = f.target % self.procs.len();
        match f.kind {
            FaultKind::Kill => {
                let p = &mut self.procs[target];
                p.kill().await;
                tokio::time::sleep(f.hold).await;
                restart(p).await?;
            }
            FaultKind::Pause => {
                let p = &mut self.procs[target];
                p.pause(true);
                tokio::time::sleep(f.hold).await;
                p.pause(false);
            }
            FaultKind::Blackhole(l) | FaultKind::Delay(l) | FaultKind::Reset(l) => {
                let Some(proxy) = self.procs[target].link(l) else {
                    return Ok(());
                };
                let fault = match f.kind {
                    FaultKind::Blackhole(_) => LinkFault::Blackhole,
                    FaultKind::Delay(_) => LinkFault::Delay(f.delay),
                    _ => LinkFault::Reset,
                };
                proxy.set(fault);
                if fault == LinkFault::Reset {
                    // Reset is a moment, not a state: new connections pass again at once.
                    proxy.set(LinkFault::Pass);
                } else {
                    tokio::time::sleep(f.hold).await;
                    proxy.set(LinkFault::Pass);
                }
            }
            FaultKind::PgTerminate => {
                if let (Some(pool), Some(proxy)) =
                    (&self.pg, self.procs[target].link(Link::Postgres))
                {
                    log.terminated += terminate_backends(pool, &proxy.upstream_ports()).await?;
                }
            }
            FaultKind::RedisRestart => {
                if let Some(r) = &mut self.redis {
                    r.restart_primary().await?;
                }
            }
            FaultKind::RedisFailover | FaultKind::StaleFailover => {
                if let Some(r) = &mut self.redis {
                    if f.kind == FaultKind::StaleFailover {
                        r.pause_replica(true);
                        tokio::time::sleep(f.hold).await;
                    }
                    let primary = r.fail_over().await?;
                    for p in &self.procs {
                        if let Some(proxy) = p.link(Link::Redis) {
                            proxy.point_at(&primary);
                            proxy.reset();
                        }
                    }
                    r.settle().await?;
                }
            }
            FaultKind::ReplicaPause => {
                if let Some(r) = &self.redis {
                    r.pause_replica(true);
                    tokio::time::sleep(f.hold).await;
                    r.pause_replica(false);
                }
            }
        }
        Ok(())
    }

    /// Every process up and running, every link passing bytes.
    pub(crate) async fn heal(&mut self) -> anyhow::Result<()> {
        if let Some(r) = &mut self.redis {
            r.heal().await?;
            let primary = r.primary_addr();
            for p in &self.procs {
                if let Some(proxy) = p.link(Link::Redis) {
                    proxy.point_at(&primary);
                }
            }
        }
        for p in &mut self.procs {
            for (_, proxy) in &p.links {
                proxy.set(LinkFault::Pass);
            }
            if p.paused {
                p.pause(false);
            }
            if !p.is_up() {
                restart(p).await?;
            }
        }
        Ok(())
    }
}

/// Starts a killed process again, a few times if it fails (its backend may be faulty too).
async fn restart(p: &mut Proc) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..5 {
        match p.start().await {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("could not restart {}", p.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(tier: Tier, seed: u64) -> Vec<String> {
        schedule(tier, 3, 200, seed, Duration::from_millis(1500))
            .iter()
            .map(|f| format!("{:?}", (f.gap, f.kind, f.target, f.hold, f.delay)))
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        assert_eq!(names(Tier::RedisStore, 7), names(Tier::RedisStore, 7));
        assert_ne!(names(Tier::RedisStore, 7), names(Tier::RedisStore, 8));
    }

    #[test]
    fn each_tier_suffers_only_the_faults_it_has_links_for() {
        let kinds = |tier| -> std::collections::BTreeSet<String> {
            schedule(tier, 3, 500, 1, Duration::from_millis(1500))
                .iter()
                .map(|f| f.kind.name())
                .collect()
        };
        assert_eq!(
            kinds(Tier::Lmdb).into_iter().collect::<Vec<_>>(),
            ["kill", "pause"]
        );
        let pg_alone = kinds(Tier::PostgresAlone);
        assert!(pg_alone.contains("pg-terminate") && pg_alone.contains("blackhole-peer"));
        assert!(!pg_alone.iter().any(|k| k.contains("redis")));
        let redis = kinds(Tier::RedisStore);
        assert!(redis.contains("stale-failover") && redis.contains("replica-pause"));
        assert!(!redis.iter().any(|k| k.contains("postgres")));
        // A pause always outlasts the lease.
        assert!(
            schedule(Tier::Postgres, 2, 500, 1, Duration::from_millis(1500))
                .iter()
                .filter(|f| f.kind == FaultKind::Pause)
                .all(|f| f.hold > Duration::from_millis(1500))
        );
    }
}
