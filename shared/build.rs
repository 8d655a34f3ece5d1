//! `sqlx::migrate!` embeds `migrations/` when this crate compiles, but on
//! stable Rust cargo does not know the macro read that directory: without
//! this, adding or editing a migration left an incremental build running the
//! old set.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
