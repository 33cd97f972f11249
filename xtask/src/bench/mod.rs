//! `cargo xtask bench <target>`: each target prints our figure beside a raw baseline from the
//! same run, and the ratio.

mod cluster;
mod cluster_pg;
mod engine;
mod llm;
mod lmdb;
mod postgres;
mod redis;
pub(crate) mod report;
mod workload;

use anyhow::{Result, bail};

pub(crate) fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let targets: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let targets = if targets.is_empty() || targets == ["all"] {
        vec!["engine", "llm", "lmdb", "postgres", "redis"]
    } else {
        targets
    };
    for t in targets {
        match t {
            "engine" => engine::run(quick)?,
            "llm" => llm::run(quick)?,
            "lmdb" => lmdb::run(quick)?,
            "postgres" => postgres::run(quick)?,
            "redis" => redis::run(quick)?,
            "cluster" => cluster::run(quick)?,
            other => bail!(
                "unknown bench target {other:?} (engine, llm, lmdb, postgres, redis, cluster, all)"
            ),
        }
    }
    Ok(())
}
