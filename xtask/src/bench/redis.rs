//! `cargo xtask bench redis` (built by the redis store's issue).

pub(crate) fn run(_quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("bench redis is not built yet")
}
