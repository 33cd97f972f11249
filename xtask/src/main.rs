//! Project tasks, run as `cargo xtask <command>` (see `.cargo/config.toml`).
//!
//! Everyday commands are a small debug build that shares the test build's dependencies; the
//! benches need optimised code and the whole workspace, so `cargo xtask bench` re-runs xtask in
//! release with the `bench` feature.
//!
//! # Layout
//! - `bench` (feature `bench`): `cargo xtask bench <engine|lmdb|postgres|redis|all>`: our figures
//!   beside a raw-client baseline measured in the same run, with the ratio.
//! - `chaos`: `cargo xtask chaos --tier T --faults N --seed S --out DIR`, the fault harness.
//! - `migrate`: `cargo xtask migrate <up|down|status|export>` for the Postgres store.
//! - `test`: the README's test command, with the list of backend skips under the summary.
//! - `llm_server`: a local llama.cpp server for the real-model test.

#[cfg(feature = "bench")]
mod alloc;
#[cfg(feature = "bench")]
mod bench;
mod chaos;
mod llm_server;
mod migrate;
mod test;

#[cfg(feature = "bench")]
#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

use anyhow::{Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  bench <engine|llm|lmdb|postgres|redis|all> [--quick]
                      benchmarks, each beside its raw baseline from the same run
  chaos --tier <0d|1|2|2p|2r>[,…] --faults N --seed S --out DIR [--clients 6] [--sessions 8]
        [--no-wait] [--quiet]
                      a fault run against real node processes, checked (normandy-chaos)
  llm-server [--model qwen|gemma] [--port N] [--print-env]
                      local OpenAI-compatible llama-server (Qwen2.5-Coder 1.5B Instruct, or
                      Gemma 3 270M) for the opt-in end-to-end LLM test
  migrate <up [--only base]|down|status|export --to DIR> [--database-url URL]
                      Postgres store migrations (DATABASE_URL when no flag)
  test [nextest args] runs the test suite (cargo nextest run --workspace) and lists the
                      tests that skipped for want of a server";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(());
    };
    match cmd.as_str() {
        "bench" => bench(rest),
        "chaos" => chaos::run(rest),
        "llm-server" => llm_server::run(rest),
        "migrate" => migrate::run(rest),
        "test" => test::run(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

/// Runs the benches: here when built with them, else by re-running xtask in release with the
/// `bench` feature (timings from a debug build would mean nothing).
#[cfg(feature = "bench")]
fn bench(args: &[String]) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!("warning: benches built without optimisations; the figures mean little");
    }
    bench::run(args)
}

#[cfg(not(feature = "bench"))]
fn bench(args: &[String]) -> Result<()> {
    let sh = xshell::Shell::new()?;
    xshell::cmd!(
        sh,
        "cargo run --quiet --package xtask --release --features bench -- bench {args...}"
    )
    .run()?;
    Ok(())
}
