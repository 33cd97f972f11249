//! `cargo xtask migrate`: the Postgres store's staged migrations, recorded in their own table
//! (`normandy_migrations`), never in the application's `_sqlx_migrations`.
//!
//! ```text
//! cargo xtask migrate up [--only base]       apply all pending migrations (or only 0001_base)
//! cargo xtask migrate down [--all]           revert the last applied migration (or all)
//! cargo xtask migrate status [--check]       applied vs pending (--check: fail when pending)
//! cargo xtask migrate export --to DIR        write the up/down SQL files into DIR
//! options: --database-url URL (else DATABASE_URL), --schema NAME (search_path)
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use normandy_store_postgres::{MIGRATIONS_TABLE, migrator};
use sqlx::migrate::MigrationType;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

const USAGE: &str = "usage: cargo xtask migrate <command> [--database-url URL] [--schema NAME]

commands:
  up [--only base]      apply every pending migration (or only 0001_base)
  down [--all]          revert the last applied migration (or every one)
  status [--check]      list applied and pending migrations (--check: exit 1 when any is pending)
  export --to DIR       write the migrations as plain up/down SQL files into DIR

The database comes from --database-url, else DATABASE_URL. Applied migrations are recorded in
the table normandy_migrations.";

struct Args {
    cmd: String,
    url: Option<String>,
    schema: Option<String>,
    only: Option<String>,
    all: bool,
    check: bool,
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
        only: None,
        all: false,
        check: false,
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
            "--only" => out.only = Some(value("--only")?),
            "--to" => out.to = Some(PathBuf::from(value("--to")?)),
            "--all" => out.all = true,
            "--check" => out.check = true,
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown argument {other:?}\n\n{USAGE}"),
        }
    }
    Ok(out)
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let args = parse(args)?;
    if args.cmd == "export" {
        return export(args.to.as_ref().context("export needs --to DIR")?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let pool = connect(&args).await?;
        match args.cmd.as_str() {
            "up" => up(&pool, args.only.as_deref()).await,
            "down" => down(&pool, args.all).await,
            "status" => status(&pool, args.check).await,
            other => bail!("unknown migrate command {other:?}\n\n{USAGE}"),
        }
    })
}

async fn connect(args: &Args) -> Result<PgPool> {
    let url = match &args.url {
        Some(u) => u.clone(),
        None => std::env::var("DATABASE_URL")
            .context("no database: pass --database-url URL or set DATABASE_URL")?,
    };
    // Never echo the URL: it may carry a password.
    let mut opts: PgConnectOptions = url.parse().context("invalid database URL")?;
    if let Some(schema) = &args.schema {
        opts = opts.options([("search_path", schema.as_str())]);
    }
    let host = opts.get_host().to_string();
    let db = opts.get_database().unwrap_or("(default)").to_string();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .with_context(|| format!("connecting to database {db} on {host}"))?;
    println!("database {db} on {host}");
    Ok(pool)
}

/// Versions recorded as applied, ascending (none when the table does not exist yet).
async fn applied(pool: &PgPool) -> Result<Vec<i64>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('normandy_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    Ok(
        sqlx::query_scalar(
            "SELECT version FROM normandy_migrations WHERE success ORDER BY version",
        )
        .fetch_all(pool)
        .await?,
    )
}

fn name(version: i64, description: &str) -> String {
    format!("{version:04}_{}", description.replace(' ', "_"))
}

async fn up(pool: &PgPool, only: Option<&str>) -> Result<()> {
    let m = migrator();
    let before = applied(pool).await?;
    match only {
        None => m.run(pool).await?,
        Some("base") => m.run_to(1, pool).await?,
        Some(other) => bail!("--only takes `base`, not {other:?}"),
    }
    let after = applied(pool).await?;
    let new: Vec<String> = m
        .iter()
        .filter(|x| x.migration_type.is_up_migration())
        .filter(|x| after.contains(&x.version) && !before.contains(&x.version))
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

async fn down(pool: &PgPool, all: bool) -> Result<()> {
    let done = applied(pool).await?;
    let Some(&last) = done.last() else {
        println!("nothing applied: nothing to revert");
        return Ok(());
    };
    let target = if all {
        0
    } else {
        done.iter().rev().nth(1).copied().unwrap_or(0)
    };
    let m = migrator();
    m.undo(pool, target).await?;
    for x in m.iter().rev() {
        if x.migration_type == MigrationType::ReversibleDown
            && x.version > target
            && x.version <= last
            && done.contains(&x.version)
        {
            println!("reverted {}", name(x.version, &x.description));
        }
    }
    Ok(())
}

async fn status(pool: &PgPool, check: bool) -> Result<()> {
    let done = applied(pool).await?;
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
