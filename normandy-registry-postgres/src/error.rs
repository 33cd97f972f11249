//! The one place where sqlx errors become [`normandy_core::Error`]s.

use normandy_core::Error;

/// Backend name carried by [`Error::Unavailable`] and [`Error::Backend`].
pub(crate) const BACKEND: &str = "postgres registry";

/// What a user runs to create the registry's tables; every `MissingMigration` carries it.
pub(crate) const MIGRATE_HINT: &str = "apply the registry migration with \
     `normandy_registry_postgres::migrator().run(&pool)`, or \
     `PgRegistryConfig::migrate_on_open(true)`, or by copying \
     normandy-registry-postgres/migrations/*.up.sql into your own migrations";

/// The typed error for a database without the registry's tables.
pub(crate) fn missing_migration() -> Error {
    Error::MissingMigration {
        session: None,
        migration: crate::schema::MIGRATION_NAME.to_string(),
        hint: MIGRATE_HINT.to_string(),
    }
}

/// Maps any sqlx error to Normandy's error, deciding whether a retry can help.
///
/// - A connection that cannot be made or broke (I/O, TLS, pool timeout, a server shutting down,
///   SQLSTATE class 08) is `Unavailable`: retryable, and for a lease refresh it means the
///   outcome is unknown (the node must stop serving before its lease can lapse).
/// - Serialization failures, deadlocks, a statement or lock wait cut short by the server's
///   timeouts (57014, 55P03) and resource exhaustion (class 53) are a retryable `Backend`
///   error: the transaction was rolled back.
/// - An undefined table or column (42P01, 42703) is a `MissingMigration` naming the migration.
/// - Everything else is a terminal `Backend` error with the driver's message.
pub(crate) fn map_sqlx(err: sqlx::Error) -> Error {
    match err {
        sqlx::Error::Io(e) => unavailable(e.to_string()),
        sqlx::Error::Tls(e) => unavailable(format!("TLS: {e}")),
        sqlx::Error::PoolTimedOut => unavailable("timed out waiting for a pooled connection"),
        sqlx::Error::PoolClosed => unavailable("the connection pool is closed"),
        sqlx::Error::WorkerCrashed => unavailable("the connection worker crashed"),
        sqlx::Error::Protocol(m) => unavailable(format!("protocol error: {m}")),
        sqlx::Error::Configuration(e) => Error::Config(format!("postgres registry: {e}")),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let message = db.message().to_string();
            match code.as_str() {
                "42P01" | "42703" => missing_migration(),
                "40001" | "40P01" | "57014" | "55P03" => Error::Backend {
                    backend: BACKEND,
                    message: format!("{message} (SQLSTATE {code}); nothing was written"),
                    retryable: true,
                },
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

pub(crate) fn unavailable(message: impl Into<String>) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        message: message.into(),
    }
}

/// A stored value this crate never writes (a negative incarnation, a bad node name).
pub(crate) fn corrupt_row(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: BACKEND,
        message: format!("unexpected {what} in the registry tables: {detail}"),
        retryable: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use normandy_core::ErrorKind;

    #[test]
    fn connection_errors_are_retryable_and_missing_tables_name_the_migration() {
        let e = map_sqlx(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        let e = missing_migration();
        assert_eq!(e.kind(), ErrorKind::MissingMigration);
        assert!(e.to_string().contains("0001_registry"), "{e}");
    }
}
