//! `cargo xtask bench lmdb` (built by the lmdb store's issue).

pub(crate) fn run(_quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("bench lmdb is not built yet")
}
