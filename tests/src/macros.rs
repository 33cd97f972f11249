//! [`store_conformance!`](crate::store_conformance) and
//! [`registry_conformance!`](crate::registry_conformance): one test per case per backend.
//!
//! The case lists live here, once: adding a case is a `pub async fn` in a file of
//! `store_cases/` (listed in the unit test's `STORE_CASE_FILES`) or in `registry_cases.rs`, plus
//! its name in the list below (a unit test checks the two agree).

/// Stamps the store conformance suite for one backend: one test named `<name>_<case>` per case
/// of [`store_cases`](crate::store_cases).
///
/// `$factory` is an expression evaluating to a future of `Option<H>` with
/// `H: `[`StoreHarness`](crate::StoreHarness) — typically an `async { ... }` block. It is
/// evaluated afresh in every test, so each case gets its own harness (its own namespace).
/// `None` means the backend is not available: the test reports
/// `SKIPPED <name>: <reason>` and passes, unless `NORMANDY_REQUIRE_BACKENDS=1`.
///
/// Each test runs on a multi-thread tokio runtime with 2 workers (what
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` builds), created by this crate,
/// so the calling crate needs neither `paste` nor tokio's macros.
///
/// ```ignore
/// normandy_tests::store_conformance!(postgres, async {
///     let url = normandy_tests::backends::postgres_url().await?;
///     Some(PgHarness::new(&url).await)
/// });
/// ```
#[macro_export]
macro_rules! store_conformance {
    ($name:ident, $factory:expr $(,)?) => {
        $crate::__store_cases! { __stamp_store; $name, $factory }
    };
}

/// Stamps the registry conformance suite for one backend: one test named `<name>_<case>` per
/// case of [`registry_cases`](crate::registry_cases). `$factory` yields `Option<H>` with
/// `H: `[`RegistryHarness`](crate::RegistryHarness); otherwise as
/// [`store_conformance!`](crate::store_conformance).
#[macro_export]
macro_rules! registry_conformance {
    ($name:ident, $factory:expr $(,)?) => {
        $crate::__registry_cases! { __stamp_registry; $name, $factory }
    };
}

/// The store cases, passed to this crate's macro `$stamp` after its arguments.
#[doc(hidden)]
#[macro_export]
macro_rules! __store_cases {
    ($stamp:ident; $($args:tt)*) => {
        $crate::$stamp! { $($args)*;
            create_returns_a_fresh_record,
            create_existing_is_already_exists_and_changes_nothing,
            load_unknown_is_none,
            activate_bumps_epoch_and_sets_owner,
            activate_unknown_is_not_found,
            activate_terminal_is_session_closed_and_changes_nothing,
            concurrent_activations_get_distinct_epochs,
            commit_applies_and_returns_new_seq,
            commit_without_entries_updates_only_state,
            commit_stale_epoch_is_fenced_and_writes_nothing,
            commit_moved_seq_is_conflict_and_writes_nothing,
            commit_duplicate_input_returns_original_seq,
            duplicate_input_is_detected_across_reopen,
            commit_bad_numbering_is_invalid_input,
            commit_unknown_session_is_not_found,
            commit_after_terminal_is_session_closed,
            entries_and_state_are_never_seen_apart,
            entries_pages_by_after_and_limit,
            entries_unknown_is_not_found,
            provider_content_is_stored_exactly,
            list_resumable_lists_only_eager_open_sessions_with_work,
            list_resumable_filters_by_owner,
            list_resumable_pages_with_cursor,
            list_resumable_follows_reactivation_by_another_node,
            list_resumable_tracks_work_terminal_and_delete,
            mark_terminal_is_fenced_and_idempotent,
            mark_terminal_unknown_is_not_found,
            delete_removes_session_and_entries,
            corrupt_turn_state_is_typed_error,
            corrupt_entry_is_typed_error,
            entry_stored_under_another_seq_is_corrupt,
            newer_format_version_is_unsupported_version,
            canary_secret_never_stored_or_logged,
            older_handle_is_fenced_after_reopen_activates,
            racing_commits_exactly_one_applies,
        }
    };
}

/// The registry cases, passed to this crate's macro `$stamp` after its arguments.
#[doc(hidden)]
#[macro_export]
macro_rules! __registry_cases {
    ($stamp:ident; $($args:tt)*) => {
        $crate::$stamp! { $($args)*;
            register_lookup_unregister,
            lookup_and_unregister_unknown,
            reregister_by_owner_returns_same_placement,
            register_by_another_node_is_already_registered,
            unregister_by_non_owner_is_a_noop,
            epochs_grow_across_reregistration,
            distinct_ids_are_independent,
            concurrent_registrations_have_one_winner,
            expired_lease_stops_resolving,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __stamp_store {
    ($name:ident, $factory:expr; $($case:ident),* $(,)?) => {
        $crate::paste::paste! {
            $(
                #[test]
                fn [<$name _ $case>]() {
                    $crate::__private::run(async {
                        match ($factory).await {
                            ::std::option::Option::Some(harness) => {
                                let harness: ::std::sync::Arc<dyn $crate::StoreHarness> =
                                    ::std::sync::Arc::new(harness);
                                $crate::store_cases::$case(harness.clone()).await;
                                $crate::StoreHarness::cleanup(&*harness).await;
                            }
                            ::std::option::Option::None => $crate::backends::skip(
                                ::std::stringify!($name),
                                &$crate::backends::skip_reason(),
                            ),
                        }
                    });
                }
            )*
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __stamp_registry {
    ($name:ident, $factory:expr; $($case:ident),* $(,)?) => {
        $crate::paste::paste! {
            $(
                #[test]
                fn [<$name _ $case>]() {
                    $crate::__private::run(async {
                        match ($factory).await {
                            ::std::option::Option::Some(harness) => {
                                let harness: ::std::sync::Arc<dyn $crate::RegistryHarness> =
                                    ::std::sync::Arc::new(harness);
                                $crate::registry_cases::$case(harness.clone()).await;
                                $crate::RegistryHarness::cleanup(&*harness).await;
                            }
                            ::std::option::Option::None => $crate::backends::skip(
                                ::std::stringify!($name),
                                &$crate::backends::skip_reason(),
                            ),
                        }
                    });
                }
            )*
        }
    };
}

/// The case names as a `&[&str]` (for [`STORE_CASES`](crate::STORE_CASES) and
/// [`REGISTRY_CASES`](crate::REGISTRY_CASES)).
#[doc(hidden)]
#[macro_export]
macro_rules! __case_names {
    (; $($case:ident),* $(,)?) => {
        &[$(::std::stringify!($case)),*]
    };
}
