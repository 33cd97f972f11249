//! `cargo xtask test [nextest args]`: the README's test command.
//!
//! Runs `cargo nextest run --workspace` (plus any extra arguments) with `NORMANDY_SKIP_LOG`
//! pointing at a fresh file, then prints the tests that skipped for want of a server, grouped by
//! reason. A skipped test returns early and the runner counts it as passed, so without this list
//! a run on a machine with no Postgres would look as green as one that exercised it.
//!
//! The exit status is the runner's: skips are shown, not failed (CI sets
//! `NORMANDY_REQUIRE_BACKENDS=1`, which makes every skip a failing test instead).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

pub(crate) fn run(args: &[String]) -> Result<()> {
    let log = skip_log_path()?;
    // A stale log from an earlier run would list skips that did not happen in this one.
    match std::fs::remove_file(&log) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", log.display())),
    }
    let sh = xshell::Shell::new()?;
    let outcome = xshell::cmd!(sh, "cargo nextest run --workspace {args...}")
        .env("NORMANDY_SKIP_LOG", &log)
        .run();
    let skips = std::fs::read_to_string(&log).unwrap_or_default();
    print_skips(&skips);
    outcome.context("the test run failed")?;
    Ok(())
}

/// `target/normandy-skips.log` in the workspace's target directory.
fn skip_log_path() -> Result<PathBuf> {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask has no parent directory")?
            .join("target"),
    };
    std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    Ok(target.join("normandy-skips.log"))
}

/// Prints the skipped tests grouped by reason, or one line saying none skipped.
fn print_skips(log: &str) {
    let grouped = group_skips(log);
    let total: usize = grouped.values().map(Vec::len).sum();
    if total == 0 {
        println!("\nbackend skips: none (every backend suite ran against a server)");
        return;
    }
    println!(
        "\nbackend skips: {total} test(s) did NOT run — the runner above counted them as passed"
    );
    for (reason, tests) in &grouped {
        println!("\n  {} skipped: {reason}", tests.len());
        for t in tests {
            println!("    {t}");
        }
    }
    println!(
        "\n  Start the servers (see README, \"Tests\"), or set NORMANDY_TEST_DATABASE_URL / \
         NORMANDY_TEST_REDIS_URL, to run them; NORMANDY_REQUIRE_BACKENDS=1 makes a skip fail."
    );
}

/// `<test>\t<reason>` lines grouped by reason; tests sorted and de-duplicated (a retried test
/// skips twice).
fn group_skips(log: &str) -> BTreeMap<String, Vec<String>> {
    let mut grouped: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let (test, reason) = line.split_once('\t').unwrap_or((line, "no reason given"));
        grouped
            .entry(reason.to_string())
            .or_default()
            .push(test.to_string());
    }
    for tests in grouped.values_mut() {
        tests.sort();
        tests.dedup();
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::group_skips;

    #[test]
    fn skips_group_by_reason_and_dedup() {
        let log = "b\tno redis\na\tno redis\nb\tno redis\nc\tno postgres\n\nd\n";
        let g = group_skips(log);
        assert_eq!(g["no redis"], vec!["a", "b"]);
        assert_eq!(g["no postgres"], vec!["c"]);
        assert_eq!(g["no reason given"], vec!["d"]);
        assert_eq!(g.len(), 3);
    }
}
