//! `cargo xtask bench engine` (being built).

pub(crate) fn run(_quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("bench engine is not built yet")
}
