//! `normandy-chaos`: a fault run against real node processes, or the checker on a run's files.
//!
//! ```text
//! normandy-chaos run --tier 0d|1|2|2p|2r[,…] --faults N --seed S --out DIR
//!     [--clients 6] [--sessions 8] [--node-bin PATH] [--no-wait] [--quiet]
//! normandy-chaos check DIR
//! ```
//! `run` finds `normandy-node` beside its own executable unless `--node-bin` says where;
//! Postgres at `NORMANDY_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! and Redis at `NORMANDY_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); tier 2r starts a
//! Redis primary and replica of its own with `redis-server`. Several tiers (`--tier 0d,1,2p`)
//! run one after the other, each into `DIR/<tier>`. It exits 1 when the checker finds a
//! violation or a session takes no input once the faults are healed, in any tier. `check` re-checks a run's
//! files (`history.jsonl`, `final.jsonl`, `tools.jsonl`, and `events.jsonl` if present).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use normandy_chaos::run::{RunConfig, Tier, run};
use normandy_chaos::{Files, check};

const USAGE: &str = "usage:
  normandy-chaos run --tier 0d|1|2|2p|2r[,…] --faults N --seed S --out DIR
      [--clients 6] [--sessions 8] [--node-bin PATH] [--no-wait] [--quiet]
  normandy-chaos check DIR";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    match cmd.as_str() {
        "run" => {
            let configs = configs(rest)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            // Every tier runs, even after one failed: the summary names each verdict.
            let mut failed = Vec::new();
            for config in &configs {
                match rt.block_on(run(config)) {
                    Ok(summary) => {
                        print!("{}", summary.table(config));
                        println!("files in {}", config.out.display());
                        if !summary.passed() {
                            failed.push(config.tier.name());
                        }
                    }
                    Err(e) => {
                        println!("tier {}: the run failed: {e:#}", config.tier.name());
                        failed.push(config.tier.name());
                    }
                }
            }
            if !failed.is_empty() {
                eprintln!("failed: tier {}", failed.join(", "));
                std::process::exit(1);
            }
            Ok(())
        }
        "check" => {
            let dir = rest.first().context(USAGE)?;
            let files = Files::read(&PathBuf::from(dir))?;
            let report = check(&files);
            print!("{report}");
            if !report.is_valid() {
                std::process::exit(1);
            }
            Ok(())
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// One run's settings per tier of `--tier` (a comma-separated list; with several, each
/// writes into `--out`/<tier>).
fn configs(args: &[String]) -> anyhow::Result<Vec<RunConfig>> {
    let base = config(args)?;
    let tiers = tier_list(args)?;
    if tiers.len() == 1 {
        return Ok(vec![RunConfig {
            tier: tiers[0],
            ..base
        }]);
    }
    Ok(tiers
        .into_iter()
        .map(|tier| RunConfig {
            tier,
            out: base.out.join(tier.name()),
            ..base.clone()
        })
        .collect())
}

fn tier_list(args: &[String]) -> anyhow::Result<Vec<Tier>> {
    let list = args
        .iter()
        .position(|a| a == "--tier")
        .and_then(|i| args.get(i + 1))
        .with_context(|| format!("missing --tier\n{USAGE}"))?;
    list.split(',').map(|t| Tier::parse(t.trim())).collect()
}

fn config(args: &[String]) -> anyhow::Result<RunConfig> {
    let mut values = HashMap::new();
    let mut switches = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--") else {
            bail!("unexpected argument {a:?}\n{USAGE}");
        };
        if matches!(name, "no-wait" | "quiet") {
            switches.push(name.to_string());
        } else {
            let v = it
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            values.insert(name.to_string(), v.clone());
        }
    }
    let need = |k: &str| {
        values
            .get(k)
            .cloned()
            .with_context(|| format!("missing --{k}\n{USAGE}"))
    };
    let number = |k: &str, default: Option<u64>| -> anyhow::Result<u64> {
        match values.get(k) {
            Some(v) => v.parse().with_context(|| format!("--{k} must be a number")),
            None => default.with_context(|| format!("missing --{k}\n{USAGE}")),
        }
    };
    let node_bin = match values.get("node-bin") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for the executable")?
            .join("normandy-node"),
    };
    if !node_bin.exists() {
        bail!(
            "no normandy-node at {} (cargo build -p normandy-node, or --node-bin PATH)",
            node_bin.display()
        );
    }
    let (clients, sessions) = (number("clients", Some(6))?, number("sessions", Some(8))?);
    if clients == 0 || sessions == 0 {
        bail!("--clients and --sessions must be at least 1");
    }
    let env = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.to_string());
    Ok(RunConfig {
        tier: tier_list(args)?[0],
        faults: number("faults", None)? as usize,
        seed: number("seed", None)?,
        out: PathBuf::from(need("out")?),
        clients: clients as usize,
        sessions: sessions as usize,
        node_bin,
        postgres_url: env(
            "NORMANDY_TEST_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        ),
        redis_url: env("NORMANDY_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
        wait: !switches.iter().any(|s| s == "no-wait"),
        progress: !switches.iter().any(|s| s == "quiet"),
    })
}
