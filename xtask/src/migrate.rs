//! `cargo xtask migrate`: the Postgres store's staged migrations, recorded in their own table
//! (`normandy_migrations`), never in the application's `_sqlx_migrations`.
//!
//! ```text
//! cargo xtask migrate up [--only base]       apply all pending migrations (or only 0001_base)
//!                         [--registry]        and the tier-2p registry's (0001_registry)
//! cargo xtask migrate down [--all]           revert the last applied migration (or all)
//! cargo xtask migrate status [--check]       applied vs pending (--check: fail when pending)
//! cargo xtask migrate export --to DIR        write the up/down SQL files into DIR
//! options: --database-url URL (else DATABASE_URL), --schema NAME (search_path),
//!          --pooler transaction (or `?pooler=transaction` on the URL)
//! ```
//!
//! Migrations run through the store crate's own runner (`apply_migrations`): one transaction per
//! migration holding a transaction-scoped advisory lock, with its settings set inside the
//! transaction, so `up` works through PgBouncer in transaction mode and two processes migrating
//! at once apply each migration once.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use normandy_registry_postgres::{MIGRATIONS_TABLE as REGISTRY_MIGRATIONS_TABLE, PgRegistryConfig};
use normandy_store_postgres::{
    MIGRATIONS_TABLE, PgStoreConfig, PoolerMode, applied_migrations, apply_migrations, migrator,
    revert_migrations,
};
use sqlx::migrate::MigrationType;

const USAGE: &str = "usage: cargo xtask migrate <command> [--database-url URL] [--schema NAME]
                            [--pooler transaction]

commands:
  up [--only base]      apply every pending migration (or only 0001_base)
     [--registry]       also apply the Postgres registry's migration (tier 2p: Postgres alone,
                        recorded in normandy_registry_migrations)
  down [--all]          revert the last applied migration (or every one)
  status [--check]      list applied and pending migrations (--check: exit 1 when any is pending)
  export --to DIR       write the migrations as plain up/down SQL files into DIR

The database comes from --database-url, else DATABASE_URL. Applied migrations are recorded in
the table normandy_migrations. Behind PgBouncer in transaction mode, RDS Proxy or Supavisor,
pass --pooler transaction (or put ?pooler=transaction on the URL).";

struct Args {
    cmd: String,
    url: Option<String>,
    schema: Option<String>,
    pooler: Option<PoolerMode>,
    only: Option<String>,
    all: bool,
    check: bool,
    registry: bool,
    to: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut it = args.iter();
    let Some(cmd) = it.next() else {
        bail!("{USAGE}");
    };
    let mut out = Args {
        cmd: cmd.clone(),
        url: None,
        schema: None,
        pooler: None,
        only: None,
        all: false,
        check: false,
        registry: false,
        to: None,
    };
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match a.as_str() {
            "--database-url" => out.url = Some(value("--database-url")?),
            "--schema" => out.schema = Some(value("--schema")?),
            "--pooler" => {
                out.pooler = Some(
                    value("--pooler")?
                        .parse()
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                )
            }
            "--only" => out.only = Some(value("--only")?),
            "--to" => out.to = Some(PathBuf::from(value("--to")?)),
            "--all" => out.all = true,
            "--check" => out.check = true,
            "--registry" => out.registry = true,
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(out)
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let args = parse(args)?;
    if args.registry && args.cmd != "up" {
        bail!("--registry goes with `up` only\n\n{USAGE}");
    }
    if args.cmd == "export" {
        return export(args.to.as_ref().context("export needs --to DIR")?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let config = config(&args)?;
        match args.cmd.as_str() {
            "up" => {
                up(&config, args.only.as_deref()).await?;
                if args.registry {
                    up_registry(&args).await?;
                }
                Ok(())
            }
            "down" => down(&config, args.all).await,
            "status" => status(&config, args.check).await,
            other => bail!("unknown migrate command {other:?}\n\n{USAGE}"),
        }
    })
}

fn url(args: &Args) -> Result<String> {
    match &args.url {
        Some(u) => Ok(u.clone()),
        None => std::env::var("DATABASE_URL")
            .context("no database: pass --database-url URL or set DATABASE_URL"),
    }
}

fn config(args: &Args) -> Result<PgStoreConfig> {
    let url = url(args)?;
    // Never echo the URL: it may carry a password (the config's errors do not repeat it).
    let mut config = PgStoreConfig::new(&url)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .application_name("normandy-migrate");
    if let Some(schema) = &args.schema {
        config = config
            .schema(schema.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Some(mode) = args.pooler {
        config = config.pooler(mode);
    }
    println!("migrating {config:?}");
    Ok(config)
}

async fn applied(config: &PgStoreConfig) -> Result<Vec<i64>> {
    applied_migrations(config)
        .await
        .map_err(|e| anyhow::anyhow!("reading applied migrations: {e}"))
}

fn name(version: i64, description: &str) -> String {
    format!("{version:04}_{}", description.replace(' ', "_"))
}

async fn up(config: &PgStoreConfig, only: Option<&str>) -> Result<()> {
    let m = migrator();
    let up_to = match only {
        None => None,
        Some("base") => Some(1),
        Some(other) => bail!("--only takes `base`, not {other:?}"),
    };
    let done = apply_migrations(config, up_to)
        .await
        .map_err(|e| anyhow::anyhow!("applying migrations: {e}"))?;
    let new: Vec<String> = m
        .iter()
        .filter(|x| x.migration_type.is_up_migration() && done.contains(&x.version))
        .map(|x| name(x.version, &x.description))
        .collect();
    if new.is_empty() {
        println!("up to date: nothing to apply");
    } else {
        for n in new {
            println!("applied {n}");
        }
    }
    Ok(())
}

/// The registry's one migration, with the same URL, schema and pooler mode as the store's.
async fn up_registry(args: &Args) -> Result<()> {
    let mut config = PgRegistryConfig::new(&url(args)?)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .application_name("normandy-migrate");
    if let Some(schema) = &args.schema {
        config = config
            .schema(schema.clone())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if let Some(mode) = args.pooler {
        config = config.transaction_pooler(mode == PoolerMode::Transaction);
    }
    let applied = normandy_registry_postgres::apply_migration(&config)
        .await
        .map_err(|e| anyhow::anyhow!("applying the registry migration: {e}"))?;
    if applied {
        println!("applied 0001_registry (recorded in {REGISTRY_MIGRATIONS_TABLE})");
    } else {
        println!("registry up to date: nothing to apply");
    }
    Ok(())
}

async fn down(config: &PgStoreConfig, all: bool) -> Result<()> {
    let done = applied(config).await?;
    if done.is_empty() {
        println!("nothing applied: nothing to revert");
        return Ok(());
    };
    let target = if all {
        0
    } else {
        done.iter().rev().nth(1).copied().unwrap_or(0)
    };
    let reverted = revert_migrations(config, target)
        .await
        .map_err(|e| anyhow::anyhow!("reverting migrations: {e}"))?;
    for x in migrator().iter().rev() {
        if x.migration_type.is_down_migration() && reverted.contains(&x.version) {
            println!("reverted {}", name(x.version, &x.description));
        }
    }
    Ok(())
}

async fn status(config: &PgStoreConfig, check: bool) -> Result<()> {
    let done = applied(config).await?;
    let m = migrator();
    let mut pending = 0;
    println!("migrations (recorded in {MIGRATIONS_TABLE}):");
    for x in m.iter().filter(|x| x.migration_type.is_up_migration()) {
        let state = if done.contains(&x.version) {
            "applied"
        } else {
            pending += 1;
            "pending"
        };
        println!("  {:<24} {state}", name(x.version, &x.description));
    }
    for v in done.iter().filter(|v| !m.version_exists(**v)) {
        println!("  {v:04}_?                  applied, unknown to this build (a newer release?)");
    }
    if pending > 0 {
        println!("{pending} pending: run `cargo xtask migrate up`");
        if check {
            bail!("{pending} migration(s) pending");
        }
    }
    Ok(())
}

fn export(dir: &PathBuf) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for x in migrator().iter() {
        let suffix = match x.migration_type {
            MigrationType::ReversibleUp => "up.sql",
            MigrationType::ReversibleDown => "down.sql",
            MigrationType::Simple => "sql",
        };
        let path = dir.join(format!("{}.{suffix}", name(x.version, &x.description)));
        std::fs::write(&path, x.sql.as_str())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
