//! Project tasks, run as `cargo xtask <command>` (always in release: see `.cargo/config.toml`).
//!
//! # Layout
//! - `bench`: `cargo xtask bench <engine|lmdb|postgres|redis|all>`: our figures beside a raw-client
//!   baseline measured in the same run, with the ratio.
//! - `migrate`: `cargo xtask migrate <up|down|status|export>` for the Postgres store.
//! - `test`: runs the README's test command.

mod alloc;
mod bench;
mod llm_server;
mod migrate;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

use anyhow::{Result, bail};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  bench <engine|llm|lmdb|postgres|redis|all> [--quick]
                      benchmarks, each beside its raw baseline from the same run
  llm-server [--model qwen|gemma] [--port N] [--print-env]
                      local OpenAI-compatible llama-server (Qwen2.5-Coder 1.5B Instruct, or
                      Gemma 3 270M) for the opt-in end-to-end LLM test
  migrate <up [--only base]|down|status|export --to DIR> [--database-url URL]
                      Postgres store migrations (DATABASE_URL when no flag)
  test                runs the test suite as CI does (cargo nextest run --workspace)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Ok(());
    };
    match cmd.as_str() {
        "bench" => bench::run(rest),
        "llm-server" => llm_server::run(rest),
        "migrate" => migrate::run(rest),
        "test" => {
            let sh = xshell::Shell::new()?;
            xshell::cmd!(sh, "cargo nextest run --workspace").run()?;
            Ok(())
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}
