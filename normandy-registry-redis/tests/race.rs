//! Placement races across OS processes: this test binary re-executes itself twice in a child
//! mode (`race_child`, ignored in normal runs), and both children register the same ids at the
//! same instant through their own connections.

use std::collections::HashMap;
use std::time::Duration;

use normandy_core::{Error, NodeId, SessionId, SessionRegistry};
use normandy_registry_redis::{RedisRegistry, RedisRegistryConfig};
use normandy_tests::backends::{redis_cluster_url, redis_url, skip, skip_reason, unique_name};

/// Registrations per id per process (two processes: 50 per id).
const PER_PROCESS: usize = 25;
/// Ids raced in one run.
const IDS: usize = 8;

const URL_VAR: &str = "NORMANDY_RACE_URL";
const PREFIX_VAR: &str = "NORMANDY_RACE_PREFIX";
const PROC_VAR: &str = "NORMANDY_RACE_PROC";
const START_VAR: &str = "NORMANDY_RACE_START_MS";

async fn open(url: &str, prefix: &str) -> RedisRegistry {
    let config = RedisRegistryConfig::new(url)
        .unwrap()
        .prefix(prefix)
        .lease_ttl(Duration::from_secs(60));
    RedisRegistry::connect(config).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_registrations_from_two_processes_have_one_winner() {
    let Some(url) = redis_url().await else {
        skip(
            "fifty_registrations_from_two_processes_have_one_winner",
            &skip_reason(),
        );
        return;
    };
    race(url).await;
}

/// The same race on a Redis Cluster, where a placement and the leases live in different slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_registrations_from_two_processes_have_one_winner_on_a_cluster() {
    let Some(url) = redis_cluster_url().await else {
        skip(
            "fifty_registrations_from_two_processes_have_one_winner_on_a_cluster",
            &skip_reason(),
        );
        return;
    };
    race(url).await;
}

async fn race(url: String) {
    let prefix = unique_name("race");
    let exe = std::env::current_exe().expect("test binary path");
    let start_ms = normandy_core::now_ms() + 1500;
    let mut children = Vec::new();
    for p in 0..2 {
        let child = tokio::process::Command::new(&exe)
            .args([
                "--exact",
                "race_child",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(URL_VAR, &url)
            .env(PREFIX_VAR, &prefix)
            .env(PROC_VAR, p.to_string())
            .env(START_VAR, start_ms.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn child process");
        children.push(child);
    }
    // id -> (node, outcome, owner named, epoch)
    let mut results: HashMap<String, Vec<(String, String, String, u64)>> = HashMap::new();
    for child in children {
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("child timed out")
            .expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let before = results.values().map(Vec::len).sum::<usize>();
        // libtest prints "test race_child ... " without a newline before the first result.
        for line in stdout
            .lines()
            .filter_map(|l| l.find("RESULT ").map(|at| &l[at + "RESULT ".len()..]))
        {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 5, "bad result line {line:?}");
            results.entry(f[0].to_string()).or_default().push((
                f[1].to_string(),
                f[2].to_string(),
                f[3].to_string(),
                f[4].parse().unwrap(),
            ));
        }
        let after = results.values().map(Vec::len).sum::<usize>();
        assert_eq!(
            after - before,
            IDS * PER_PROCESS,
            "a child reported too few results"
        );
    }

    let registry = open(&url, &prefix).await;
    assert_eq!(results.len(), IDS);
    for (id, rs) in &results {
        assert_eq!(rs.len(), 2 * PER_PROCESS, "{id}");
        let winners: Vec<_> = rs.iter().filter(|r| r.1 == "won").collect();
        assert_eq!(winners.len(), 1, "{id}: winners {winners:?}");
        let (winner, _, _, epoch) = winners[0];
        for (node, outcome, named, e) in rs {
            if outcome == "lost" {
                assert_eq!(named, winner, "{id}: {node} was told the wrong winner");
                assert_eq!(e, epoch, "{id}: {node} was told the wrong epoch");
            }
        }
        // Winners came from both processes across the ids? Not required; but the placement
        // stored is the winner's.
        let placement = registry
            .lookup(&SessionId::new(id).unwrap())
            .await
            .unwrap()
            .expect("winner placed");
        assert_eq!(&placement.owner.to_string(), winner);
        assert_eq!(placement.epoch, *epoch);
    }
    let processes: std::collections::BTreeSet<_> = results
        .values()
        .flat_map(|rs| {
            rs.iter()
                .map(|r| r.0.split('-').next().unwrap().to_string())
        })
        .collect();
    assert_eq!(processes.len(), 2, "both processes took part");
    registry.purge().await.unwrap();
}

/// Child mode of the test above; does nothing unless started by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of fifty_registrations_from_two_processes_have_one_winner"]
async fn race_child() {
    let (Ok(url), Ok(prefix), Ok(p), Ok(start)) = (
        std::env::var(URL_VAR),
        std::env::var(PREFIX_VAR),
        std::env::var(PROC_VAR),
        std::env::var(START_VAR),
    ) else {
        return;
    };
    let start: u64 = start.parse().unwrap();
    // Several connections per process, so registrations really interleave at the server.
    let mut registries = Vec::new();
    for _ in 0..4 {
        registries.push(std::sync::Arc::new(open(&url, &prefix).await));
    }
    let nodes: Vec<NodeId> = (0..PER_PROCESS)
        .map(|i| NodeId::new(format!("p{p}-n{i}"), 7).unwrap())
        .collect();
    for (i, n) in nodes.iter().enumerate() {
        registries[i % registries.len()]
            .acquire_lease(n)
            .await
            .unwrap();
    }
    let now = normandy_core::now_ms();
    tokio::time::sleep(Duration::from_millis(start.saturating_sub(now))).await;
    let mut tasks = Vec::new();
    for id in 0..IDS {
        for (i, node) in nodes.iter().enumerate() {
            let registry = registries[i % registries.len()].clone();
            let node = node.clone();
            let id = SessionId::new(format!("race-{id}")).unwrap();
            tasks.push(tokio::spawn(async move {
                let r = registry.register(&id, &node).await;
                (id, node, r)
            }));
        }
    }
    for t in tasks {
        let (id, node, r) = t.await.unwrap();
        match r {
            Ok(p) => {
                assert_eq!(p.owner, node);
                println!("RESULT {id} {node} won {node} {}", p.epoch);
            }
            Err(Error::AlreadyRegistered { owner, epoch, .. }) => {
                println!("RESULT {id} {node} lost {owner} {epoch}");
            }
            Err(e) => panic!("register {id} for {node}: {e}"),
        }
    }
}
