//! `cargo xtask chaos`: builds `normandy-node` and the harness (debug, sharing the test build),
//! then runs `normandy-chaos run` with the arguments given — see `normandy-chaos/README.md`.

use anyhow::Result;
use xshell::{Shell, cmd};

pub(crate) fn run(args: &[String]) -> Result<()> {
    let sh = Shell::new()?;
    cmd!(
        sh,
        "cargo build --quiet --package normandy-node --package normandy-chaos"
    )
    .run()?;
    cmd!(
        sh,
        "cargo run --quiet --package normandy-chaos -- run {args...}"
    )
    .run()?;
    Ok(())
}
