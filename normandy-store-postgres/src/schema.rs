//! The staged schema: the embedded migrations, which of them a database has ([`SchemaLevel`],
//! read from the catalog), and the check a store makes before it opens on a database.

use normandy_core::Result;
use sqlx::Row;

use crate::config::PgStoreConfig;
use crate::conn::Db;
use crate::error::{map_sqlx, missing_migration};

/// The table in which [`migrator`] records applied migrations.
pub const MIGRATIONS_TABLE: &str = "normandy_migrations";

/// The staged migrations, oldest first, by the name their files carry.
pub(crate) const MIGRATION_NAMES: [&str; 3] = ["0001_base", "0002_template", "0003_resume_policy"];

/// The staged migrations, embedded at build time, recording into [`MIGRATIONS_TABLE`].
///
/// Versions are 1 (`base`), 2 (`template`) and 3 (`resume_policy`); run all with
/// `migrator().run(&pool)`, only the base with `migrator().run_to(1, &pool)`, and revert with
/// `migrator().undo(&pool, target)`. Tables are created in the connection's `search_path`.
///
/// This is sqlx's migrator: it takes a *session* advisory lock and relies on the connection's
/// `search_path`, neither of which survives a transaction-pooling pooler. Through one (and
/// anywhere several processes may migrate at once), use
/// [`apply_migrations`](crate::apply_migrations) instead, which the store's
/// [`migrate_on_open`](PgStoreConfig::migrate_on_open) and `cargo xtask migrate` use.
pub fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("./migrations");
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    m
}

/// How far a database's schema goes: which of the staged migrations it has.
///
/// Detected from the catalog when the store opens, so it is right however the migrations were
/// applied (`cargo xtask migrate`, [`migrator`], or the SQL files copied into an
/// application's own migrations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SchemaLevel {
    /// `0001_base`: sessions and entries. Sessions have no template and are all lazy.
    Base,
    /// `0002_template`: sessions may store their configuration template.
    Template,
    /// `0003_resume_policy`: resume policies and the resumable indexes (the latest).
    ResumePolicy,
}

impl SchemaLevel {
    /// The level this build writes and reads in full.
    pub const LATEST: SchemaLevel = SchemaLevel::ResumePolicy;

    /// The migration that brings a database to this level.
    pub fn migration(self) -> &'static str {
        MIGRATION_NAMES[self as usize]
    }

    /// Migrations this build knows that a database at this level lacks, oldest first.
    pub fn missing(self) -> Vec<&'static str> {
        MIGRATION_NAMES[self as usize + 1..].to_vec()
    }

    fn next(self) -> Option<SchemaLevel> {
        match self {
            SchemaLevel::Base => Some(SchemaLevel::Template),
            SchemaLevel::Template => Some(SchemaLevel::ResumePolicy),
            SchemaLevel::ResumePolicy => None,
        }
    }
}

const DETECT_SQL: &str = "SELECT \
    to_regclass('normandy_sessions') IS NOT NULL AND to_regclass('normandy_entries') IS NOT NULL, \
    EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('normandy_sessions') \
            AND attname = 'template' AND NOT attisdropped), \
    EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('normandy_sessions') \
            AND attname = 'resume_policy' AND NOT attisdropped) \
      AND to_regclass('normandy_sessions_resumable_owner_idx') IS NOT NULL \
      AND to_regclass('normandy_sessions_resumable_idx') IS NOT NULL";

/// Applies the migrations if `config` asks for it, then reads the database's level and refuses
/// one older than [`PgStoreConfig::require_schema`].
pub(crate) async fn check(db: &Db, config: &PgStoreConfig) -> Result<SchemaLevel> {
    if config.migrate_on_open {
        crate::migrate::apply(db, None).await?;
    }
    let level = detect_level(db).await?;
    let Some(level) = level else {
        return Err(missing_migration(MIGRATION_NAMES[0]));
    };
    if level < config.require_schema {
        let first = level.next().unwrap_or(SchemaLevel::LATEST);
        return Err(missing_migration(first.migration()));
    }
    if level < SchemaLevel::LATEST {
        tracing::warn!(
            missing = ?level.missing(),
            "postgres store opened on an older schema: templates and eager resume need the missing migrations"
        );
    }
    Ok(level)
}

async fn detect_level(db: &Db) -> Result<Option<SchemaLevel>> {
    let mut op = db.op().await.map_err(map_sqlx)?;
    let row = sqlx::query(DETECT_SQL)
        .persistent(db.persistent())
        .fetch_one(op.conn())
        .await
        .map_err(map_sqlx)?;
    op.finish().await.map_err(map_sqlx)?;
    let base: bool = row.try_get(0).map_err(map_sqlx)?;
    let template: bool = row.try_get(1).map_err(map_sqlx)?;
    let resume: bool = row.try_get(2).map_err(map_sqlx)?;
    // Stages count only in order: a later one without an earlier one is treated as absent.
    Ok(match (base, template, resume) {
        (false, _, _) => None,
        (true, false, _) => Some(SchemaLevel::Base),
        (true, true, false) => Some(SchemaLevel::Template),
        (true, true, true) => Some(SchemaLevel::ResumePolicy),
    })
}
