//! `cargo xtask migrate` (built by the Postgres store's issue).

pub(crate) fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("migrate is not built yet")
}
