//! `cargo xtask bench cluster` (built by the cluster issue).

pub(crate) fn run(_quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("bench cluster is not built yet")
}
