//! `cargo xtask bench postgres` (built by the postgres store's issue).

pub(crate) fn run(_quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("bench postgres is not built yet")
}
