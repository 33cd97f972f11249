//! `normandy-lmdb-verify <dir>`: walks every page of the LMDB environment at `<dir>` and prints
//! one report line; exits 0 when the environment is whole, 1 when it is damaged (or cannot be
//! read), and dies by a signal when LMDB itself meets a bad page. Run by
//! `normandy_store_lmdb::verify`, which turns each of these into a result; run it by hand
//! after a crash, or on a copy made with `mdb_copy -c`.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [dir] if dir != "-h" && dir != "--help" => {
            normandy_store_lmdb::verify::child_main(Path::new(dir))
        }
        _ => {
            eprintln!(
                "usage: normandy-lmdb-verify <environment directory>\n\
                 Walks every page of the store's LMDB environment (read-only; safe while a \
                 store has it open) and reports damage."
            );
            ExitCode::from(2)
        }
    }
}
