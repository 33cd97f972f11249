//! The one place where sqlx errors become [`normandy_core::Error`]s.

use normandy_core::Error;

use crate::schema::MIGRATION_NAMES;

/// Backend name carried by [`Error::Unavailable`] and [`Error::Backend`].
pub(crate) const BACKEND: &str = "postgres";

/// What a user runs to bring a database up to date; every `MissingMigration` carries it.
pub(crate) const MIGRATE_HINT: &str = "apply the Normandy migrations with \
     `cargo xtask migrate up --database-url <URL>` (in the Normandy repository), or \
     `normandy_store_postgres::migrator().run(&pool)` from your code, or by copying \
     normandy-store-postgres/migrations/*.up.sql into your own migrations";

/// The typed error for a database that lacks migration `name`.
pub(crate) fn missing_migration(name: &str) -> Error {
    Error::MissingMigration {
        session: None,
        migration: name.to_string(),
        hint: MIGRATE_HINT.to_string(),
    }
}

/// Maps any sqlx error to Normandy's error, deciding whether a retry can help.
///
/// - A connection that cannot be made or broke (I/O, TLS, pool timeout, a server shutting down
///   or terminating the backend, SQLSTATE class 08) is `Unavailable` (retryable). A commit that
///   failed this way may or may not have been applied: retrying it with the same input ids is
///   safe, because a duplicate input is reported, never appended twice.
/// - Serialization failures and deadlocks (40001, 40P01), a statement or lock wait cut short by
///   the store's server-side timeouts (57014, 55P03) and resource exhaustion (class 53) are a
///   retryable `Backend` error: the transaction was rolled back.
/// - An undefined table or column (42P01, 42703) is a `MissingMigration` naming the migration
///   that creates it, with the command to run, never a raw SQL error.
/// - Everything else is a terminal `Backend` error with the driver's message.
pub(crate) fn map_sqlx(err: sqlx::Error) -> Error {
    match err {
        sqlx::Error::Io(e) => unavailable(e.to_string()),
        sqlx::Error::Tls(e) => unavailable(format!("TLS: {e}")),
        sqlx::Error::PoolTimedOut => unavailable("timed out waiting for a pooled connection"),
        sqlx::Error::PoolClosed => unavailable("the connection pool is closed"),
        sqlx::Error::WorkerCrashed => unavailable("the connection worker crashed"),
        sqlx::Error::Protocol(m) => unavailable(format!("protocol error: {m}")),
        sqlx::Error::Configuration(e) => Error::Config(format!("postgres: {e}")),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let message = db.message().to_string();
            match code.as_str() {
                // undefined_table / undefined_column: the schema is behind the code.
                "42P01" | "42703" => missing_migration(migration_for(&message)),
                // query_canceled (statement_timeout) and lock_not_available (lock_timeout): the
                // statement was cut short and its transaction rolled back.
                "40001" | "40P01" | "57014" | "55P03" => Error::Backend {
                    backend: BACKEND,
                    message: format!("{message} (SQLSTATE {code}); nothing was written"),
                    retryable: true,
                },
                // admin_shutdown, crash_shutdown, cannot_connect_now, and a terminated backend.
                "57P01" | "57P02" | "57P03" | "57P05" => {
                    unavailable(format!("{message} (SQLSTATE {code})"))
                }
                c if c.starts_with("08") => unavailable(format!("{message} (SQLSTATE {code})")),
                c if c.starts_with("53") => Error::Backend {
                    backend: BACKEND,
                    message: format!("{message} (SQLSTATE {code})"),
                    retryable: true,
                },
                _ => Error::Backend {
                    backend: BACKEND,
                    message: format!("{message} (SQLSTATE {code})"),
                    retryable: false,
                },
            }
        }
        sqlx::Error::Migrate(e) => Error::Backend {
            backend: BACKEND,
            message: format!("migration failed: {e}"),
            retryable: false,
        },
        other => Error::Backend {
            backend: BACKEND,
            message: other.to_string(),
            retryable: false,
        },
    }
}

fn unavailable(message: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: message.into(),
    }
}

/// Which migration creates the object an "undefined table/column" message names.
fn migration_for(message: &str) -> &'static str {
    if message.contains("resume_policy") || message.contains("resumable_owner_idx") {
        MIGRATION_NAMES[2]
    } else if message.contains("template") {
        MIGRATION_NAMES[1]
    } else {
        MIGRATION_NAMES[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use normandy_core::ErrorKind;

    #[test]
    fn connection_errors_are_retryable_unavailable() {
        let e = map_sqlx(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        assert_eq!(
            map_sqlx(sqlx::Error::PoolTimedOut).kind(),
            ErrorKind::Unavailable
        );
    }

    #[test]
    fn names_the_migration_an_undefined_object_needs() {
        assert_eq!(
            migration_for(r#"column "template" does not exist"#),
            "0002_template"
        );
        assert_eq!(
            migration_for(r#"column "resume_policy" does not exist"#),
            "0003_resume_policy"
        );
        assert_eq!(
            migration_for(r#"relation "normandy_sessions" does not exist"#),
            "0001_base"
        );
        let e = missing_migration("0001_base");
        assert_eq!(e.kind(), ErrorKind::MissingMigration);
        assert!(e.to_string().contains("cargo xtask migrate up"), "{e}");
    }
}
